/* Parallel byte-offset decoding of a batch of CBF streams.
 *
 * A stream is cut into chunks of CHUNK bytes.  A position p is an "anchor"
 * when no byte 0x80 among the 14 before it can start a token reaching past
 * p: the parse must then land on p, whatever came before.  Each chunk parses
 * from its first anchor up to the first anchor at or past its end, so the
 * segments tile the stream exactly without any sequential pass; a chunk with
 * no anchor (dense exception runs) is absorbed by the chunk before it.
 *   bo_count : per segment, number of values and wrapped sum of deltas
 *   bo_scan  : per frame, exclusive prefix sums of both (one work-group)
 *   bo_write : per segment, values = base + running sum, written as int32
 * Deltas are summed modulo 2^32, which gives fabio's int32 result exactly,
 * 64-bit escapes included.  Errors set bits in frame_error:
 * 1 = escape cut by the end of the stream, 2 = value count differs.
 */

inline int token_len(global const uchar *s, long p, long end)
{
    if (s[p] != 0x80) return 1;
    if (p + 3 > end) return 0;
    if (!(s[p + 1] == 0x00 && s[p + 2] == 0x80)) return 3;
    if (p + 7 > end) return 0;
    if (!(s[p + 3] == 0x00 && s[p + 4] == 0x00 && s[p + 5] == 0x00 && s[p + 6] == 0x80)) return 7;
    if (p + 15 > end) return 0;
    return 15;
}

inline uint token_delta(global const uchar *s, long p, int len)
{
    if (len == 1) return (uint)(int)(char)s[p];
    if (len == 3) return (uint)(int)(short)((ushort)s[p + 1] | ((ushort)s[p + 2] << 8));
    if (len == 7) return (uint)s[p + 3] | ((uint)s[p + 4] << 8) | ((uint)s[p + 5] << 16) | ((uint)s[p + 6] << 24);
    return (uint)s[p + 7] | ((uint)s[p + 8] << 8) | ((uint)s[p + 9] << 16) | ((uint)s[p + 10] << 24);
}

inline int is_anchor(global const uchar *s, long p, long end)
{
    long lo = p - 14 < 0 ? 0 : p - 14;
    for (long q = p - 1; q >= lo; q--) {
        if (s[q] == 0x80) {
            int len = token_len(s, q, end);
            if (len == 0 || q + len > p) return 0;
        }
    }
    return 1;
}

kernel void bo_count(global const uchar *raw, global const long *frame_offset, global const int *frame_size,
                     global long *seg_start, global long *seg_end, global uint *seg_count, global uint *seg_sum,
                     global int *frame_error, const int max_chunks)
{
    const int c = get_global_id(0);
    const int f = get_global_id(1);
    if (c >= max_chunks) return;
    const long size = frame_size[f];
    global const uchar *s = raw + frame_offset[f];
    const long cstart = (long)c * CHUNK;
    const int idx = f * max_chunks + c;
    seg_count[idx] = 0;
    seg_sum[idx] = 0;
    seg_start[idx] = 0;
    seg_end[idx] = 0;
    if (cstart >= size) return;
    const long cend = min(cstart + CHUNK, size);
    long p = cstart;
    while (p < cend && !is_anchor(s, p, size)) p++;
    if (p >= cend) return;  /* no anchor: the chunk before parses through this one */
    const long a = p;
    uint count = 0, sum = 0;
    while (p < size) {
        if (p >= cend && is_anchor(s, p, size)) break;
        int len = token_len(s, p, size);
        if (len == 0) {
            atomic_or(frame_error + f, 1);
            break;
        }
        sum += token_delta(s, p, len);
        count++;
        p += len;
    }
    seg_start[idx] = a;
    seg_end[idx] = p;
    seg_count[idx] = count;
    seg_sum[idx] = sum;
}

kernel void bo_scan(global const uint *seg_count, global const uint *seg_sum, global uint *seg_pos,
                    global uint *seg_base, global int *frame_error, const int max_chunks, const int n_expected)
{
    local uint lc[SCAN_WG];
    local uint ls[SCAN_WG];
    const int f = get_group_id(0);
    const int lid = get_local_id(0);
    const int per = (max_chunks + SCAN_WG - 1) / SCAN_WG;
    const int begin = lid * per;
    const int end = min(begin + per, max_chunks);
    global const uint *cnt = seg_count + (long)f * max_chunks;
    global const uint *sm = seg_sum + (long)f * max_chunks;
    uint c = 0, s = 0;
    for (int i = begin; i < end; i++) {
        c += cnt[i];
        s += sm[i];
    }
    lc[lid] = c;
    ls[lid] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int off = 1; off < SCAN_WG; off <<= 1) {
        uint tc = lid >= off ? lc[lid - off] : 0;
        uint ts = lid >= off ? ls[lid - off] : 0;
        barrier(CLK_LOCAL_MEM_FENCE);
        lc[lid] += tc;
        ls[lid] += ts;
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    uint pc = lid ? lc[lid - 1] : 0;
    uint ps = lid ? ls[lid - 1] : 0;
    for (int i = begin; i < end; i++) {
        seg_pos[(long)f * max_chunks + i] = pc;
        seg_base[(long)f * max_chunks + i] = ps;
        pc += cnt[i];
        ps += sm[i];
    }
    if (lid == SCAN_WG - 1 && lc[lid] != (uint)n_expected) atomic_or(frame_error + f, 2);
}

kernel void bo_write(global const uchar *raw, global const long *frame_offset, global const int *frame_size,
                     global const long *seg_start, global const long *seg_end, global const uint *seg_pos,
                     global const uint *seg_count, global const uint *seg_base, global int *image,
                     const int max_chunks, const int npix)
{
    /* Values of the work-group's consecutive segments are contiguous in the image: decode them into
     * local memory, then write the whole range with coalesced stores (one thread per chunk writing
     * its own run would make every store of a warp hit a different cache line). */
    local int lout[WRITE_WG * CHUNK];
    const int c = get_global_id(0);
    const int f = get_global_id(1);
    const int lid = get_local_id(0);
    const int c0 = get_group_id(0) * WRITE_WG;
    const int clast = min(c0 + WRITE_WG, max_chunks) - 1;
    global int *out = image + (long)f * npix;
    const long fbase = (long)f * max_chunks;
    const uint base = seg_pos[fbase + c0];
    const uint total = seg_pos[fbase + clast] + seg_count[fbase + clast] - base;
    const int staged = total <= WRITE_WG * CHUNK;
    if (c < max_chunks) {
        const int idx = fbase + c;
        long p = seg_start[idx];
        const long e = seg_end[idx];
        const long size = frame_size[f];
        global const uchar *s = raw + frame_offset[f];
        uint pos = seg_pos[idx];
        uint v = seg_base[idx];
        while (p < e) {
            int len = token_len(s, p, size);
            if (len == 0) break;
            v += token_delta(s, p, len);
            if (staged) lout[pos - base] = (int)v;
            else if (pos < (uint)npix) out[pos] = (int)v;
            pos++;
            p += len;
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (staged) {
        for (uint i = lid; i < total; i += WRITE_WG) {
            if (base + i < (uint)npix) out[base + i] = lout[i];
        }
    }
}
