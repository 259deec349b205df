"""OpenCL device discovery, shared by the integration engine and the back-projector."""

from __future__ import annotations

import pyopencl as cl


def list_devices() -> list[tuple[int, int, object]]:
    """(platform index, device index, device) for every OpenCL device."""
    out = []
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        return out
    for pi, platform in enumerate(platforms):
        try:
            devices = platform.get_devices()
        except cl.Error:
            continue
        for di, device in enumerate(devices):
            out.append((pi, di, device))
    return out


def find_device(spec: str | None = None, gpu_only: bool = False):
    """Pick a device by ``"P:D"`` indices or a substring of its name or platform; None when none fits.

    Without a spec: the first GPU, else (unless ``gpu_only``) the first device.
    """
    devices = list_devices()
    if spec:
        spec_l = spec.lower()
        for pi, di, dev in devices:
            if spec_l == f"{pi}:{di}" or spec_l in dev.name.lower() or spec_l in dev.platform.name.lower():
                return dev
        return None
    gpus = [d for _, _, d in devices if d.type & cl.device_type.GPU]
    if gpus:
        return gpus[0]
    if gpu_only or not devices:
        return None
    return devices[0][2]
