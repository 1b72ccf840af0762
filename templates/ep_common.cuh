// Shared device helpers for ep_jit's EP kernels: element types, 16-byte vector
// copies, and system-scope flags that order the phases between GPUs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "ep_args.cuh"

namespace ep_jit {

// ---- 16-byte vectors -------------------------------------------------------

// Streaming load of read-once data: skip L1 so it does not evict what is reused.
__device__ __forceinline__ int4 ld_stream(const int4* p) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Store that bypasses L1 and is not kept in L2 on the way to a peer.
__device__ __forceinline__ void st_stream(int4* p, const int4& v) {
    asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1,%2,%3,%4};"
                 :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// Lanes of a warp copy vectors [begin, end) of one row (int4s at `src`) into each of the
// rows `rows` of `dst`, `row_vecs` int4s apart (< 0: none; the same on every lane), kUnroll
// loads in flight per lane (the tail too, predicated), each vector read once: the expert
// layout writes a token to every expert it picked. Reads from a peer want 8 (fewer round
// trips over NVLink); local copies run faster with 4 (measured on H200).
template <int kUnroll, int kRows>
__device__ __forceinline__ void warp_copy_to_rows(int4* dst, const int (&rows)[kRows], int row_vecs, const int4* src,
                                                  int begin, int end, int lane) {
    for (int i = begin + lane; i < end; i += kUnroll * kWarpSize) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (i + u * kWarpSize < end) v[u] = ld_stream(src + i + u * kWarpSize);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            if (rows[r] < 0) continue;
            int4* to = dst + static_cast<int64_t>(rows[r]) * row_vecs;
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (i + u * kWarpSize < end) st_stream(to + i + u * kWarpSize, v[u]);
        }
    }
}

constexpr int kLocalCopyUnroll = 4;  // loads in flight per lane for a copy within one GPU

// Vectors [begin, end) of a row from src to dst.
template <int kUnroll = kLocalCopyUnroll>
__device__ __forceinline__ void warp_copy(int4* dst, const int4* src, int begin, int end, int lane) {
    const int here[1] = {0};
    warp_copy_to_rows<kUnroll, 1>(dst, here, 0, src, begin, end, lane);
}

// Warps per row when there are few rows for the warps: one warp needs several round trips
// for a 14 KB row (a round: `round` vectors, kUnroll loads per lane), so spare warps take a
// slice each, at most as many slices as the row has rounds.
__device__ __forceinline__ int row_parts(int rows, int workers, int row_vecs, int round) {
    return max(1, min(workers / max(rows, 1), (row_vecs + round - 1) / round));
}

// Rows cut into `parts` slices that start at multiples of a warp's 32 vectors (the last may
// be shorter, or empty): work item i is slice part(i) of row (or chunk) row(i). kSplit false:
// one slice, the whole row, known at compile time, so the loop compiles as an unsplit one
// (at 4096 rows a runtime slice cost 5-10 %).
template <bool kSplit>
struct RowSlices {
    int n, span;
    __device__ __forceinline__ RowSlices(int parts, int row_vecs)
        : n(kSplit ? parts : 1),
          span(kSplit ? (row_vecs + parts * kWarpSize - 1) / (parts * kWarpSize) * kWarpSize : row_vecs) {}
    __device__ __forceinline__ int parts() const { return kSplit ? n : 1; }
    __device__ __forceinline__ int row(int item) const { return kSplit ? item / n : item; }
    __device__ __forceinline__ int part(int item) const { return kSplit ? item % n : 0; }
    __device__ __forceinline__ int begin(int part) const { return kSplit ? part * span : 0; }
    __device__ __forceinline__ int end(int part, int row_vecs) const {
        return kSplit ? min(row_vecs, (part + 1) * span) : row_vecs;
    }
};

// ---- system-scope flags ----------------------------------------------------
// A flag word holds an identity in its high 32 bits (the group tag's high half mixed
// with the Buffer's nonce, so neither a kernel of another group nor a stale word of an
// earlier Buffer of this group matches) and a sequence number in the low 32. Sequences
// are unsigned and wrap; every comparison of two of them is modulo 2^32.

__device__ __forceinline__ uint64_t flag_identity(uint64_t tag, uint32_t nonce) {
    return (tag & 0xffffffff00000000ull) ^ (static_cast<uint64_t>(nonce) << 32);
}

__device__ __forceinline__ uint64_t make_flag(uint64_t identity, uint32_t seq) { return identity | seq; }

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}

// For the host's reads of mapped memory: every write before it lands first.
__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}

// A counter of the blocks of one grid: each adds with release (its block's writes, ordered
// before it by a barrier, go with it) and acquire (the one that sees the count reach the end
// has seen every block's writes). GPU scope: a system-scope fence costs about a microsecond.
__device__ __forceinline__ int atomic_add_acq_rel_gpu(int* p, int v) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ uint64_t global_time_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ int ld_volatile(const int* p) { return *reinterpret_cast<const volatile int*>(p); }

// Kernels read the device copy of the status words; reading mapped host memory from every
// warp would serialise on the bus, so only the first writer of a word also stores it there.
__device__ __forceinline__ Status status_of(const Peers& p) { return Status{p.ws->status, p.mailbox->status}; }

__device__ __forceinline__ bool failed(const Status& st) { return ld_volatile(st.device) != 0; }

__device__ __forceinline__ void report(const Status& st, int word, int value) {
    if (atomicCAS(st.device + word, 0, value) == 0) {
        *reinterpret_cast<volatile int*>(st.host + word) = value;
        __threadfence_system();
    }
}

__device__ __forceinline__ void raise_error(const Status& st, int phase, int peer) {
    report(st, 0, (phase << 16) | (peer + 1));
}

// A flag has reached `want` when it carries the same identity and the same or a later
// sequence (modulo 2^32): a peer may already be a round ahead (a combine that needs no
// rows from this rank finishes without waiting for it), and its flags only move forward.
// Flags that every peer posts every round stay within a few rounds of each other, far
// inside the 2^31 window. With `exact`, only `want` itself counts: for flags that are not
// posted every round and can never be ahead (combine's chunk flags).
__device__ __forceinline__ bool flag_reached(uint64_t flag, uint64_t want, bool exact) {
    if (exact) return flag == want;
    const int32_t ahead = static_cast<int32_t>(static_cast<uint32_t>(flag) - static_cast<uint32_t>(want));
    return (flag >> 32) == (want >> 32) && ahead >= 0;
}

// Spin until *p has reached want. Gives up when the deadline passes or another wait has
// already failed, so a dead peer becomes an error on the host instead of a hang.
__device__ __forceinline__ bool wait_flag(const uint64_t* p, uint64_t want, uint64_t timeout_ns, const Status& st,
                                          int phase, int peer, bool exact = false) {
    if (flag_reached(ld_acquire_sys(p), want, exact)) return true;  // no clock read when it is there
    const uint64_t deadline = global_time_ns() + timeout_ns;
    while (!flag_reached(ld_acquire_sys(p), want, exact)) {
        if (failed(st)) return false;
        if (global_time_ns() > deadline) {
            raise_error(st, phase, peer);
            return false;
        }
        __nanosleep(32);
    }
    return true;
}

// ---- the symmetric buffer ---------------------------------------------------

template <typename U>
__device__ __forceinline__ U* sym_ptr(uint64_t base, long long offset) {
    return reinterpret_cast<U*>(base + offset);
}

__device__ __forceinline__ uint64_t* flag_slot(uint64_t base, const SymLayout& L, int kind, int peer,
                                               int num_ranks) {
    return sym_ptr<uint64_t>(base, L.flags) + kind * num_ranks + peer;
}

// Threads 0..R-1 of the block each wait for one peer's flag in this rank's buffer.
// Returns false if any wait failed, decided once for the whole block so it leaves together.
template <int NUM_RANKS>
__device__ __forceinline__ bool block_wait_all(uint64_t my_base, const SymLayout& L, int kind, uint64_t want,
                                               uint64_t timeout_ns, const Status& st, int phase) {
    bool ok = true;
    if (threadIdx.x < NUM_RANKS)
        ok = wait_flag(flag_slot(my_base, L, kind, threadIdx.x, NUM_RANKS), want, timeout_ns, st, phase, threadIdx.x);
    return !__syncthreads_or(!ok || failed(st));
}

// True on thread 0 of the last of `num_blocks` blocks to get here, which also resets the
// counter. What every block wrote or read before is ordered before what the last one does
// next (atomic_add_acq_rel_gpu), and a system-scope release it then makes (post_all) carries
// all of it to the peers: release and acquire are cumulative, whatever their scopes.
__device__ __forceinline__ bool last_block_arrives(int* counter, int num_blocks) {
    __syncthreads();
    if (threadIdx.x != 0 || atomic_add_acq_rel_gpu(counter, 1) != num_blocks - 1) return false;
    *counter = 0;
    return true;
}

// Post `want` into slot [kind][rank] of every peer, unless a wait of this operation has
// failed: a peer must never take a broken round for a finished one.
template <int NUM_RANKS>
__device__ __forceinline__ bool post_all(const uint64_t* peers, const SymLayout& L, int kind, int rank, uint64_t want,
                                         const Status& st) {
    if (failed(st)) return false;
    for (int p = 0; p < NUM_RANKS; ++p) st_release_sys(flag_slot(peers[p], L, kind, rank, NUM_RANKS), want);
    return true;
}

// The last block posts `want` to every peer and records `seq` as done in *done (if given).
template <int NUM_RANKS>
__device__ __forceinline__ void grid_done_post(int* counter, int num_blocks, const uint64_t* peers,
                                               const SymLayout& L, int kind, int rank, uint64_t want, const Status& st,
                                               uint32_t* done = nullptr, uint32_t seq = 0) {
    if (last_block_arrives(counter, num_blocks) && post_all<NUM_RANKS>(peers, L, kind, rank, want, st) &&
        done != nullptr)
        *done = seq;
}

// ---- rows grouped by peer, walked in interleaved chunks ------------------------
// Rows [offsets[p], offsets[p+1]) belong to peer p. Chunk c covers up to size(p) rows of
// peer p = (c + rank) % R, the (c / R)-th chunk of that peer's rows, so consecutive
// chunks (and so the warps of the grid at any moment) spread over every peer's link
// instead of draining one peer after another. Chunk sizes are runtime values: a few rows
// would otherwise leave most warps idle (at 128 rows, 32-row chunks kept 4 warps of 384 busy).

// Rows per chunk so that `rows` rows make about `workers` chunks, within [1, most].
__device__ __forceinline__ int chunk_rows_for(int rows, int workers, int most) {
    return max(1, min(most, (rows + workers - 1) / max(workers, 1)));
}

template <int NUM_RANKS>
struct PeerChunks {
    const int* offsets;  // [NUM_RANKS + 1], in shared memory
    int total;           // rows past this are not touched
    int rank;
    int count;           // number of chunks
    int workers, most, uniform;  // uniform > 0: every peer's chunk size; 0: sized per peer

    // `workers` warps share the chunks, of at most `most` rows each. `per_peer`: size each
    // peer's chunks by its own rows over workers / R, what both ends of a pair can compute
    // (combine flags each chunk); else one size for all, by every row over the workers.
    __device__ __forceinline__ PeerChunks(const int* off, int total_rows, int my_rank, int num_workers,
                                          int most_rows, bool per_peer)
        : offsets(off), total(total_rows), rank(my_rank), workers(num_workers), most(most_rows),
          uniform(per_peer ? 0 : chunk_rows_for(min(off[NUM_RANKS], total_rows), num_workers, most_rows)) {
        int chunks = 0;
        for (int p = 0; p < NUM_RANKS; ++p) {
            const int n = off[p + 1] - off[p];
            chunks = max(chunks, (n + size(p) - 1) / size(p));
        }
        count = NUM_RANKS * chunks;
    }
    // Rows per chunk of a peer with `rows` rows, sized per peer: what the other end of the
    // pair computes from the same count to find a chunk's flag.
    static __device__ __forceinline__ int peer_size(int rows, int num_workers, int most_rows) {
        return chunk_rows_for(rows, num_workers / NUM_RANKS, most_rows);
    }
    // Rows per chunk of peer p.
    __device__ __forceinline__ int size(int p) const {
        return uniform > 0 ? uniform : peer_size(offsets[p + 1] - offsets[p], workers, most);
    }
    // The peer and the row range [begin, end) of chunk c (empty when begin >= end).
    __device__ __forceinline__ int peer(int c) const { return (c + rank) % NUM_RANKS; }
    __device__ __forceinline__ int begin(int c) const { return offsets[peer(c)] + (c / NUM_RANKS) * size(peer(c)); }
    __device__ __forceinline__ int end(int c) const {
        return min(min(begin(c) + size(peer(c)), offsets[peer(c) + 1]), total);
    }
};

// ---- fp32 sum of bf16 rows ----------------------------------------------------
// A warp writes vectors [begin, end) of dst = sum of the rows in `from` (nullptr = absent),
// accumulated in fp32 in rank order, so the result does not depend on scheduling. Several
// vectors per lane per step keep about sixteen 16-byte loads in flight (eight: 1.3x slower
// on 4 x H200). `weights` (nullptr: all 1) scales row r by weights[r] before it is added.
template <int NUM_ROWS>
constexpr int kSumUnroll = NUM_ROWS >= 16 ? 1 : 16 / NUM_ROWS;  // vectors per lane per step

template <int kVecs, int NUM_RANKS>
__device__ __forceinline__ void warp_sum_rows(int4* __restrict__ dst, const int4* const (&from)[NUM_RANKS],
                                              int lane, const float* weights = nullptr, int begin = 0,
                                              int end = kVecs) {
    constexpr int kU = kSumUnroll<NUM_RANKS>;
    for (int v0 = begin + lane; v0 < end; v0 += kWarpSize * kU) {
        int4 raw[kU][NUM_RANKS];
#pragma unroll
        for (int u = 0; u < kU; ++u)
#pragma unroll
            for (int r = 0; r < NUM_RANKS; ++r) {
                const int v = v0 + u * kWarpSize;
                if (v < end && from[r] != nullptr) raw[u][r] = from[r][v];
            }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const int v = v0 + u * kWarpSize;
            if (v >= end) break;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
            for (int r = 0; r < NUM_RANKS; ++r) {
                if (from[r] == nullptr) continue;
                const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw[u][r]);
#pragma unroll
                for (int i = 0; i < 8; ++i)
                    acc[i] = weights == nullptr ? acc[i] + __bfloat162float(h[i])
                                                : fmaf(weights[r], __bfloat162float(h[i]), acc[i]);
            }
            int4 packed;
            __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&packed);
#pragma unroll
            for (int i = 0; i < 8; ++i) o[i] = __float2bfloat16(acc[i]);
            dst[v] = packed;
        }
    }
}

// ---- block-wide exclusive scan of one int per thread ------------------------

template <int kThreads>
__device__ __forceinline__ int block_exclusive_scan(int value, int* total, int* smem /* kThreads/32 + 1 */) {
    static_assert(kThreads % kWarpSize == 0, "block size must be a multiple of 32");
    constexpr int kWarps = kThreads / kWarpSize;
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    int inclusive = value;
#pragma unroll
    for (int d = 1; d < kWarpSize; d <<= 1) {
        int other = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += other;
    }
    if (lane == kWarpSize - 1) smem[warp] = inclusive;
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0;
        for (int w = 0; w < kWarps; ++w) { int c = smem[w]; smem[w] = run; run += c; }
        smem[kWarps] = run;
    }
    __syncthreads();
    const int result = smem[warp] + inclusive - value;
    *total = smem[kWarps];
    __syncthreads();  // smem may be reused by the caller's next round
    return result;
}

}  // namespace ep_jit
