"""The OpenCL engine, run for real (PoCL on the CPU in CI, the GPU where there is one)."""

from __future__ import annotations

import numpy as np
import pytest
from _support import REAL, real_file, write_cbf

from pipeline import cbf, decode
from pipeline.config import ReductionConfig
from pipeline.cpu_engine import CpuEngine
from pipeline.engines import EngineFailure
from pipeline.geometry import build_setup

cl = pytest.importorskip("pyopencl")
from pipeline.opencl.engine import OpenCLEngine, find_device  # noqa: E402

pytestmark = pytest.mark.opencl
DEVICE = find_device()
if DEVICE is None:
    pytest.skip("no OpenCL device", allow_module_level=True)

GENERIC_PONI = ("Distance: 0.1\nPoni1: {p1}\nPoni2: {p2}\nRot1: 0.01\nRot2: 0.02\nRot3: 0\n"
                "PixelSize1: 0.0001\nPixelSize2: 0.0001\nWavelength: 1e-10\n")


def generic_setup(shape, **kwargs):
    poni = GENERIC_PONI.format(p1=shape[0] * 5e-5, p2=shape[1] * 4e-5)
    return build_setup(ReductionConfig(poni_text=poni, dummy=-2, delta_dummy=1.5, **kwargs), shape=shape)


def frames_of(tmp_path, arrays):
    return [cbf.read_frame(write_cbf(tmp_path / f"f{i}.cbf", a)) for i, a in enumerate(arrays)]


def adversarial(shape, rng, kind):
    n = shape[0] * shape[1]
    if kind == "dense16":  # nearly every delta needs a 16-bit escape
        return np.cumsum(rng.choice([-1, 1], n) * rng.integers(200, 30000, n)).astype(np.int32).reshape(shape)
    if kind == "dense32":  # every delta needs a 32-bit escape
        return (rng.integers(-2**31, 2**31 - 1, n, dtype=np.int64)).astype(np.int32).reshape(shape)
    if kind == "x80":  # deltas whose bytes are 0x80 everywhere (escape markers inside payloads)
        vals = np.resize(np.array([0, -32640, 0, 128, -128 * 257, 0x8080, 0x80808080 - 2**32], np.int64), n)
        return np.cumsum(vals).astype(np.int32).reshape(shape)
    if kind == "pilatus":
        data = rng.poisson(30, shape).astype(np.int32)
        data.reshape(-1)[rng.choice(n, n // 10, replace=False)] = -1
        data.reshape(-1)[rng.choice(n, n // 100, replace=False)] = rng.integers(2**17, 2**20, n // 100)
        return data
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["pilatus", "dense16", "dense32", "x80"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (67, 129), (195, 487)])
def test_device_decoder_equals_fabio(tmp_path, kind, shape):
    import fabio

    rng = np.random.default_rng(sum(shape) + len(kind))
    arrays = [adversarial(shape, rng, kind) for _ in range(3)]
    frames = frames_of(tmp_path, arrays)
    setup = generic_setup(shape, bins=16)
    engine = OpenCLEngine(setup, DEVICE, batch_size=4, slots=1)
    images = engine.decode_batch(frames)
    for i, img in enumerate(images):
        assert isinstance(img, np.ndarray), img
        assert np.array_equal(img, fabio.open(str(tmp_path / f"f{i}.cbf")).data)


@pytest.mark.parametrize("name", ["ndtomo/CeO2.cbf", "cbf-ctypes/agbeh_long.cbf", "giscan/example.cbf",
                                  "dials-data-files/l-cyst_01_00001.cbf"])
def test_device_decoder_on_real_pilatus_2m(real_dir, name):
    frame = cbf.read_frame(real_file(name, real_dir))
    setup = build_setup(ReductionConfig.from_files(REAL / "ndtomo" / "CeO2.poni", bins=100))
    engine = OpenCLEngine(setup, DEVICE, batch_size=2, slots=1)
    out = engine.decode_batch([frame, frame])
    ref = decode.decode(frame)
    assert all(np.array_equal(o, ref) for o in out)


@pytest.mark.parametrize("split", ["no", "bbox", "full"])
def test_device_integration_matches_pyfai(split):
    import fabio

    path = REAL / "ndtomo" / "CeO2.cbf"
    if not path.exists():
        pytest.skip("CeO2 data not available")
    config = ReductionConfig.from_files(REAL / "ndtomo" / "CeO2.poni", mask_path=str(REAL / "ndtomo" / "mask.edf"),
                                        bins=700, split=split, unit="q_A^-1", polarization=0.9)
    setup = build_setup(config)
    frame = cbf.read_frame(path)
    engine = OpenCLEngine(setup, DEVICE, batch_size=3, slots=2)
    results = engine.integrate_batch([frame] * 3)
    ref = setup.integrator.integrate1d(fabio.open(str(path)).data, 700, **setup.pyfai_kwargs())
    for res in results:
        np.testing.assert_allclose(res.intensity, ref.intensity, rtol=2e-6, atol=1e-30)
        np.testing.assert_allclose(res.sigma, ref.sigma, rtol=2e-6, atol=1e-30)


def test_batch_with_bad_frames_reports_each(tmp_path):
    shape = (40, 50)
    rng = np.random.default_rng(5)
    good = [adversarial(shape, rng, "pilatus") for _ in range(3)]
    frames = frames_of(tmp_path, good)
    blob = (tmp_path / "f1.cbf").read_bytes()
    head = cbf.parse_header(blob)
    short = blob.replace(f"X-Binary-Size: {head.binary_size}".encode(),
                         f"X-Binary-Size: {head.binary_size - 1}".encode())
    bad = cbf.parse_frame(short)
    other = cbf.read_frame(write_cbf(tmp_path / "other.cbf", np.zeros((41, 50), np.int32)))
    setup = generic_setup(shape, bins=30, split="bbox")
    engine = OpenCLEngine(setup, DEVICE, batch_size=8, slots=1)
    results = engine.integrate_batch([frames[0], bad, frames[1], other, frames[2]])
    cpu = CpuEngine(setup)
    assert isinstance(results[1], cbf.CorruptCbfError)
    assert isinstance(results[3], cbf.CorruptCbfError) and "shape" in str(results[3])
    for k, frame in zip((0, 2, 4), frames):
        ref = cpu.integrate(frame)
        np.testing.assert_allclose(results[k].intensity, ref.intensity, rtol=2e-6, atol=1e-30)


def test_concurrent_batches_from_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    shape = (64, 96)
    rng = np.random.default_rng(9)
    frames = frames_of(tmp_path, [adversarial(shape, rng, "pilatus") for _ in range(12)])
    setup = generic_setup(shape, bins=50)
    engine = OpenCLEngine(setup, DEVICE, batch_size=3, slots=3)
    cpu = CpuEngine(setup)
    with ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(engine.integrate_batch, [frames[i:i + 3] for i in range(0, 12, 3)]))
    for i, res in enumerate(r for b in batches for r in b):
        np.testing.assert_allclose(res.intensity, cpu.integrate(frames[i]).intensity, rtol=2e-6, atol=1e-30)


def test_device_failure_mid_scan_is_redone_on_cpu(tmp_path):
    """A kernel failure raises EngineFailure; the runner redoes the frames on the CPU and finishes."""
    from pipeline.runner import Reducer
    from pipeline.scan import ScanModel

    shape = (30, 40)
    rng = np.random.default_rng(11)
    landing = tmp_path / "landing"
    landing.mkdir()
    for i in range(10):
        write_cbf(landing / f"img_{i:05d}.cbf", adversarial(shape, rng, "pilatus"))
    setup = generic_setup(shape, bins=20)
    engine = OpenCLEngine(setup, DEVICE, batch_size=2, slots=1)
    calls = {"n": 0}
    original = engine._process

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise cl.LogicError("clEnqueueNDRangeKernel", cl.status_code.OUT_OF_RESOURCES, "injected failure")
        return original(*args, **kwargs)

    engine._process = flaky
    events = []
    reducer = Reducer(setup.config, landing, tmp_path / "out.h5", scan=ScanModel(1, 10), live=False, setup=setup,
                      engine=engine, on_event=lambda kind, text: events.append((kind, text)))
    reducer.start()
    assert reducer.wait(60)
    m = reducer.snapshot()
    assert m.state == "done", m.message
    assert m.frames_processed == 10 and m.frames_failed == 0
    assert m.engine.startswith("cpu")
    assert any(kind == "engine" and "redoing" in text for kind, text in events)
    import h5py

    with h5py.File(tmp_path / "out.h5", "r") as f:
        inten = f["entry/integrated/intensity"][()]
    cpu = CpuEngine(setup)
    for i in range(10):
        ref = cpu.integrate(cbf.read_frame(landing / f"img_{i:05d}.cbf"))
        np.testing.assert_allclose(inten[i], ref.intensity, rtol=2e-6)


def test_missing_device_is_reported():
    from pipeline.engines import make_engine

    setup = generic_setup((10, 10), bins=5)
    cfg = ReductionConfig(**{**setup.config.to_dict(), "engine": "opencl", "opencl_device": "no-such-device"})
    with pytest.raises(EngineFailure, match="no OpenCL device"):
        make_engine(setup, cfg)
    cfg = ReductionConfig(**{**setup.config.to_dict(), "engine": "auto", "opencl_device": None})
    assert make_engine(setup, cfg).name in ("cpu", "opencl")


def test_load_run_reads_a_run_into_pinned_memory_and_names_each_bad_file(tmp_path):
    """Runs of files through one page-locked region: good frames (headers checked against the last one parsed
    in full, or parsed in full) integrate like the CPU engine; each bad file comes back as its own error."""
    shape = (40, 50)
    rng = np.random.default_rng(8)
    paths = [write_cbf(tmp_path / f"g{i}.cbf", adversarial(shape, rng, "pilatus")) for i in range(4)]
    (tmp_path / "garbage.cbf").write_bytes(b"not a frame at all" * 50)
    blob = paths[0].read_bytes()
    (tmp_path / "cut.cbf").write_bytes(blob[: len(blob) - 40])
    other = write_cbf(tmp_path / "other.cbf", np.zeros((41, 50), np.int32))
    setup = generic_setup(shape, bins=30)
    engine = OpenCLEngine(setup, DEVICE, batch_size=8, slots=1)
    cpu = CpuEngine(setup)
    for run in ([paths[0], paths[1]], [tmp_path / "garbage.cbf", paths[2], tmp_path / "cut.cbf", other, paths[3],
                                       tmp_path / "gone.cbf"]):
        loaded = engine.load_run(run)
        for path, item in zip(run, loaded):
            if path in paths or path == other:  # a frame (the other shape is refused when integrated)
                assert item.pinned and item.header == cbf.read_frame(path).header
            else:
                assert isinstance(item, (cbf.CbfError, OSError)), (path, item)
        if run[-1].name == "gone.cbf":
            assert isinstance(loaded[-1], FileNotFoundError)
            assert isinstance(loaded[0], cbf.NotACbfError) and isinstance(loaded[2], cbf.IncompleteCbfError)
        good = [item for item in loaded if not isinstance(item, Exception)]
        results = engine.integrate_batch(good)
        for frame, res in zip(good, results):
            if frame.shape == shape:
                np.testing.assert_allclose(res.intensity, cpu.integrate(frame).intensity, rtol=2e-6, atol=1e-30)
            else:
                assert isinstance(res, cbf.CorruptCbfError) and "shape" in str(res)
    assert engine.arena.take(timeout=0) is not None  # regions come back once their frames are released


def test_failure_in_a_later_chunk_redoes_every_frame_from_intact_bytes(tmp_path):
    """A batch larger than batch_size runs in chunks; when a later chunk fails, the frames of the earlier
    chunks must still hold their bytes (their region not given back and refilled) for the CPU redo."""
    from pipeline.engines import EngineFailure

    shape = (30, 40)
    rng = np.random.default_rng(12)
    paths = [write_cbf(tmp_path / f"a{i}.cbf", adversarial(shape, rng, "pilatus")) for i in range(6)]
    other = [write_cbf(tmp_path / f"b{i}.cbf", adversarial(shape, rng, "pilatus")) for i in range(6)]
    setup = generic_setup(shape, bins=20)
    engine = OpenCLEngine(setup, DEVICE, batch_size=4, slots=1, staging_frames=2)
    frames = engine.load_run(paths[:2]) + engine.load_run(paths[2:6])  # two regions, one batch of 6 > 4
    original = engine._process
    calls = {"n": 0}

    def fail_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise cl.LogicError("clEnqueueNDRangeKernel", cl.status_code.OUT_OF_RESOURCES, "injected failure")
        return original(*args, **kwargs)

    engine._process = fail_second
    with pytest.raises(EngineFailure):
        engine.integrate_batch(frames)
    # a reader now tries to take a region: none may be free while the failed batch's frames hold them
    assert engine.arena.take(timeout=0.05) is None
    cpu = CpuEngine(setup)
    for path, frame in zip(paths, frames):
        assert bytes(frame.raw) == bytes(cbf.read_frame(path).raw)
        np.testing.assert_allclose(cpu.integrate(frame).intensity, cpu.integrate(cbf.read_frame(path)).intensity)
    del other


def test_wrong_shape_frames_give_their_staging_region_back(tmp_path):
    shape = (30, 40)
    setup = generic_setup(shape, bins=20)
    engine = OpenCLEngine(setup, DEVICE, batch_size=4, slots=1, staging_frames=3)
    wrong = write_cbf(tmp_path / "w.cbf", np.ones((31, 40), np.int32))
    for _ in range(10):  # more runs than regions: each must come back
        frames = engine.load_run([wrong])
        assert frames[0].pinned
        result = engine.integrate_batch(frames)
        assert isinstance(result[0], cbf.CorruptCbfError)
    taken = [engine.arena.take(timeout=0.05) for _ in range(engine.arena.regions)]
    assert None not in taken
