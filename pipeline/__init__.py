"""xrdct pipeline: Pilatus CBF frames in, azimuthally integrated XRD-CT sinograms out.

Nothing in this package imports Tango; the device server in ``tango_ds`` and
the ``xrdct`` command drive the same objects.
"""

__version__ = "0.1.0"
