/* Batched azimuthal integration: CSR (bin-major) sparse matrix times decoded frames.
 *
 * One work-group per (bin, frame).  Sums are accumulated in double, as in
 * pyFAI's Cython engine, so results match integrate1d within float32
 * rounding.  Pixels whose value lies in the dummy range (Pilatus -1 gaps,
 * -2 bad pixels) are left out of this frame's signal and their weight is
 * taken off the static per-bin normalisation.  The image never leaves the
 * device: only intensity, sigma and count per bin are written.
 */
#pragma OPENCL EXTENSION cl_khr_fp64 : enable

kernel void csr_integrate(global const int *image, const int npix,
                          global const float *coef, global const int *indices, global const int *indptr,
                          global const float *norm, global const double *static_norm,
                          global const double *static_count, const float lo, const float hi,
                          const int check_dummy, const int poisson, const float empty,
                          global const int *frame_error, global float *out, const int nbins)
{
    local double l_sig[INT_WG];
    local double l_var[INT_WG];
    local double l_dn[INT_WG];
    local double l_dc[INT_WG];
    const int bin = get_group_id(0);
    const int f = get_group_id(1);
    const int lid = get_local_id(0);
    if (frame_error[f]) {  /* undecodable frame: no pattern, count -1 tells the host */
        if (lid == 0) {
            global float *o = out + (long)f * 3 * nbins;
            o[bin] = empty;
            o[nbins + bin] = empty;
            o[2 * nbins + bin] = -1.0f;
        }
        return;
    }
    global const int *img = image + (long)f * npix;
    double sig = 0.0, var = 0.0, dn = 0.0, dc = 0.0;
    const int stop = indptr[bin + 1];
    for (int k = indptr[bin] + lid; k < stop; k += INT_WG) {
        const int j = indices[k];
        const float c = coef[k];
        const float v = (float)img[j];
        if (check_dummy && v >= lo && v <= hi) {
            dn += (double)c * (double)norm[j];
            dc += (double)c;
        } else {
            sig += (double)c * (double)v;
            if (poisson) var += (double)c * (double)c * fmax((double)v, 1.0);
        }
    }
    l_sig[lid] = sig;
    l_var[lid] = var;
    l_dn[lid] = dn;
    l_dc[lid] = dc;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int step = INT_WG / 2; step > 0; step >>= 1) {
        if (lid < step) {
            l_sig[lid] += l_sig[lid + step];
            l_var[lid] += l_var[lid + step];
            l_dn[lid] += l_dn[lid + step];
            l_dc[lid] += l_dc[lid + step];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) {
        const double nrm = static_norm[bin] - l_dn[0];
        const double cnt = static_count[bin] - l_dc[0];
        global float *o = out + (long)f * 3 * nbins;
        if (nrm > 0.0) {
            o[bin] = (float)(l_sig[0] / nrm);
            o[nbins + bin] = poisson ? (float)(sqrt(l_var[0]) / nrm) : empty;
        } else {
            o[bin] = empty;
            o[nbins + bin] = empty;
        }
        o[2 * nbins + bin] = (float)cnt;
    }
}
