"""OpenCL engine: parallel byte-offset decoding and CSR integration on the device."""
