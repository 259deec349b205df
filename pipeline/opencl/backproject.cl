/*
 * Pixel-driven parallel-beam back-projection of filtered sinograms (filtered back-projection, second half).
 *
 * One work item per (x, y, channel).  For every rotation the pixel centre (x, y), taken relative to the
 * rotation axis, lands on the detector (translation) coordinate
 *
 *     t = center + x cos(theta) - y sin(theta)
 *
 * (the convention of pipeline.simulate.radon and scikit-image: theta = 0 integrates along the image rows'
 * direction, i.e. over y).  The filtered projection is interpolated linearly at t; positions outside
 * [0, n_det - 1] contribute nothing.  Rotations with weight 0 (not measured yet) are skipped.
 *
 * filtered : float [channels][n_angles][n_det]
 * trig     : float2 [n_angles] = (cos theta, sin theta)
 * weights  : float [n_angles]  angular weight of each rotation (0 = unused)
 * out      : float [channels][size][size]  (row = y, column = x)
 * origin   : pixel index of the rotation axis on the output grid ((size - 1) / 2)
 * radius2  : pixels with x^2 + y^2 > radius2 are set to 0 (radius2 < 0: no mask)
 */

__kernel void backproject(__global const float *filtered,
                          __global const float2 *trig,
                          __global const float *weights,
                          const int n_angles,
                          const int n_det,
                          const int size,
                          const float center,
                          const float origin,
                          const float radius2,
                          __global float *out)
{
    const int ix = get_global_id(0);
    const int iy = get_global_id(1);
    const int ch = get_global_id(2);
    if (ix >= size || iy >= size)
        return;
    const float x = (float)ix - origin;
    const float y = (float)iy - origin;
    float acc = 0.0f;
    if (radius2 < 0.0f || x * x + y * y <= radius2) {
        __global const float *base = filtered + (size_t)ch * (size_t)n_angles * (size_t)n_det;
        const float tmax = (float)(n_det - 1);
        for (int a = 0; a < n_angles; a++) {
            const float w = weights[a];
            if (w == 0.0f)
                continue;
            const float2 cs = trig[a];
            const float t = center + x * cs.x - y * cs.y;
            if (t < 0.0f || t > tmax)
                continue;
            int i0 = (int)t;  /* t >= 0: truncation is floor */
            if (i0 > n_det - 2)
                i0 = n_det - 2;
            const float f = t - (float)i0;
            __global const float *row = base + (size_t)a * (size_t)n_det;
            const float v0 = row[i0];
            const float v1 = row[i0 + 1];
            acc += w * (v0 + f * (v1 - v0));
        }
    }
    out[((size_t)ch * (size_t)size + (size_t)iy) * (size_t)size + (size_t)ix] = acc;
}
