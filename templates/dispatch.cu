// Dispatch over NVLink: dispatch_kernel runs the send phase, then the pull phase (two
// launches, or one for a non-blocking dispatch of few tokens).
//
// send phase    on the source. Blocks [0, R) each compute the routing layout of one
//               destination (layout.cuh), including the list of tokens it will pull;
//               the last of them exchanges the counts with every peer and publishes the
//               receive layout (offsets on the device; in default mode also the totals in
//               mapped host memory, where the host reads them without synchronising the
//               stream). The other blocks meanwhile stage this rank's tokens (rows,
//               scales, top-k) in its own symmetric buffer and then raise kStageReady at
//               every peer. So the host learns the counts while the tokens are still
//               being staged. Every block first waits until every peer has pulled the
//               previous stage.
// pull phase    on the destination, once every source's stage is ready: row j of the
//               output is row j - offset[s] of source s's list, so rows come out ordered
//               by (source rank, source token index). Reads are 16-byte loads from the
//               peer's buffer, one warp per row (fewer rows than warps: a slice of a
//               row per warp); chunks of up to 32 rows alternate between sources so
//               every link is busy at once. Expert ids become local ids (others -1,
//               weight 0). Rows past the received count, up to the capacity, are marked
//               empty (-1, 0); rows past the capacity are reported in status word 2 and
//               not copied. capacity < 0 abandons the dispatch (a rank passed
//               bad ids): nothing is copied, the stage is released.
// A source whose top-k ids were out of range (found by the layout) says so in its counts
// row, so every rank learns it in the exchange and can raise before any token moves.
// Why the receiver pulls instead of the sender pushing: rows then land once, directly in
// the caller's exact-size outputs, which exist only after the count exchange; a push
// would land in the receiver's symmetric buffer and need a second, local copy (or
// outputs of worst-case size). Combine pushes, into a buffer its reduce reads anyway.
#include "layout.cuh"

namespace ep_jit {

// The expert layout's segments, from every source's pairs per local expert (counts[src *
// row + 1 + e]): expert e's rows start at offsets[e], off_{e+1} = ceil((off_e + n_e) / P) * P,
// and source src's pairs of e start at base[src][e] (sources in rank order).
template <int kLocal, int NUM_RANKS>
__device__ __forceinline__ void expert_segments(const int* counts, int row, const int* per_expert, int pad,
                                                int* offsets, int* base) {
    if (threadIdx.x == 0) {
        int off = 0;
        for (int e = 0; e < kLocal; ++e) {
            offsets[e] = off;
            off = (off + per_expert[e] + pad - 1) / pad * pad;
        }
        offsets[kLocal] = off;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kLocal; e += blockDim.x) {
        int run = offsets[e];
        for (int src = 0; src < NUM_RANKS; ++src) {
            base[src * kLocal + e] = run;
            run += counts[src * row + 1 + e];
        }
    }
    __syncthreads();
}

// The count exchange, run by one block: send my counts to every destination and raise
// its kCountsReady flag, wait for every source's, publish the receive layout.
template <int NUM_EXPERTS, int NUM_RANKS>
__device__ __forceinline__ void exchange_counts(const int* tokens_per_rank, const int* tokens_per_expert,
                                                const uint64_t* __restrict__ peers, const SymLayout& L, int rank,
                                                uint64_t want, uint32_t ticket, uint64_t timeout_ns, const Status& st,
                                                int* recv_offsets, int* local_expert_counts, Mailbox* mailbox,
                                                int pad_multiple, int* expert_offsets, int* expert_base,
                                                int* sent_counts, uint64_t* counts_ready) {
    static_assert(NUM_RANKS <= kMaxRanks && NUM_EXPERTS / NUM_RANKS <= kMaxLocalExperts, "mailbox too small");
    constexpr int kLocal = NUM_EXPERTS / NUM_RANKS;
    constexpr int kRow = 2 + kLocal;  // tokens, per local expert, bad top-k report
    __shared__ int from[NUM_RANKS];
    const uint64_t my_base = peers[rank];

    // every thread copies some entries (written by the other layout blocks: read past L1);
    // one thread per destination would wait for each load in turn
    for (int i = threadIdx.x; i < NUM_RANKS * kRow; i += blockDim.x) {
        const int dst = i / kRow, k = i % kRow;
        const int value = k == 0 ? ld_volatile(tokens_per_rank + dst)
                        : k == kRow - 1 ? ld_volatile(st.device + 1)
                                        : ld_volatile(tokens_per_expert + dst * kLocal + k - 1);
        sym_ptr<int>(peers[dst], L.counts)[rank * kRow + k] = value;
        if (k == 0) sent_counts[dst] = value;  // kept with the handle: combine sizes its chunks by it
    }
    __syncthreads();  // every thread's counts (and the layout blocks' send lists) go with the releases
    if (threadIdx.x < NUM_RANKS)
        st_release_sys(flag_slot(peers[threadIdx.x], L, kCountsReady, rank, NUM_RANKS), want);
    if (!block_wait_all<NUM_RANKS>(my_base, L, kCountsReady, want, timeout_ns, st, kPhaseNotify)) return;
    const int* counts = sym_ptr<int>(my_base, L.counts);
    if (threadIdx.x < NUM_RANKS) from[threadIdx.x] = counts[threadIdx.x * kRow];
    __syncthreads();

    // the host reads the counts only when it waits for them (ticket != 0): mapped host
    // memory is written over PCIe, and a later release waits for those writes
    const bool to_host = ticket != 0;
    for (int e = threadIdx.x; e < kLocal; e += blockDim.x) {
        int sum = 0;
        for (int src = 0; src < NUM_RANKS; ++src) sum += counts[src * kRow + 1 + e];
        local_expert_counts[e] = sum;
        if (to_host) mailbox->tokens_per_expert[e] = sum;
    }
    if (threadIdx.x == 0) {
        int run = 0;
        for (int src = 0; src < NUM_RANKS; ++src) {
            recv_offsets[src] = run;
            if (to_host) mailbox->recv_from[src] = from[src];
            run += from[src];
        }
        recv_offsets[NUM_RANKS] = run;
        if (to_host) mailbox->recv_total = run;
        for (int src = 0; src < NUM_RANKS; ++src) {
            const int bad = counts[src * kRow + kRow - 1];
            if (bad != 0 && mailbox->bad_source == 0) {
                mailbox->bad_index = bad;
                mailbox->bad_source = src + 1;
            }
        }
    }
    __syncthreads();
    if (pad_multiple > 0) expert_segments<kLocal, NUM_RANKS>(counts, kRow, local_expert_counts, pad_multiple,
                                                             expert_offsets, expert_base);
    if (threadIdx.x == 0) {  // after the barrier, so the block's writes go with both releases
        if (to_host) st_release_sys(&mailbox->done_ticket, ticket);
        st_release_sys(counts_ready, want);  // for the pull blocks of the fused dispatch
    }
}

// Blocks [first, gridDim.x) copy this rank's tokens into its stage, `parts` warps per row.
// `restage`: x holds bf16 rows (a gradient) and only they are staged, for a pull along an
// earlier layout.
template <int HIDDEN, int TOPK, typename T, bool kSplit>
__device__ __forceinline__ void stage_rows(const T* __restrict__ x, const float* __restrict__ scales,
                                           const int64_t* __restrict__ topk_idx, const float* __restrict__ topk_weights,
                                           int num_tokens, uint64_t my_base, const SymLayout& L, int first,
                                           bool restage, int parts) {
    constexpr int kScales = HIDDEN / kScaleBlock;
    const int kVecs = HIDDEN * (restage ? 2 : static_cast<int>(sizeof(T))) / 16;
    const int lane = threadIdx.x % kWarpSize;
    const int warp = ((blockIdx.x - first) * blockDim.x + threadIdx.x) / kWarpSize;
    const int num_warps = (gridDim.x - first) * blockDim.x / kWarpSize;
    int4* stage_x = sym_ptr<int4>(my_base, L.stage_x);
    int64_t* stage_idx = sym_ptr<int64_t>(my_base, L.stage_idx);
    float* stage_w = sym_ptr<float>(my_base, L.stage_weights);
    float* stage_s = sym_ptr<float>(my_base, L.stage_scales);
    const RowSlices<kSplit> slices(parts, kVecs);
    for (int item = warp; item < num_tokens * slices.parts(); item += num_warps) {
        const int t = slices.row(item), part = slices.part(item);
        warp_copy(stage_x + static_cast<int64_t>(t) * kVecs, reinterpret_cast<const int4*>(x) + static_cast<int64_t>(t) * kVecs,
                  slices.begin(part), slices.end(part, kVecs), lane);
        if (restage || part != 0) continue;
        for (int k = lane; k < TOPK; k += kWarpSize) {
            stage_idx[t * TOPK + k] = topk_idx[t * TOPK + k];
            stage_w[t * TOPK + k] = topk_weights[t * TOPK + k];
        }
        if constexpr (sizeof(T) == 1)
            for (int i = lane; i < kScales; i += kWarpSize) stage_s[t * kScales + i] = scales[t * kScales + i];
    }
}

// stage_rows, with the rows cut into slices when they are fewer than the staging warps.
template <int HIDDEN, int TOPK, typename T>
__device__ __forceinline__ void stage_tokens(const T* __restrict__ x, const float* __restrict__ scales,
                                             const int64_t* __restrict__ topk_idx,
                                             const float* __restrict__ topk_weights, int num_tokens,
                                             uint64_t my_base, const SymLayout& L, int first, bool restage) {
    static_assert(HIDDEN * sizeof(T) % 16 == 0, "rows must be whole 16-byte vectors");
    const int vecs = HIDDEN * (restage ? 2 : static_cast<int>(sizeof(T))) / 16;
    const int parts = row_parts(num_tokens, (gridDim.x - first) * blockDim.x / kWarpSize, vecs,
                                kLocalCopyUnroll * kWarpSize);
    if (parts > 1)
        stage_rows<HIDDEN, TOPK, T, true>(x, scales, topk_idx, topk_weights, num_tokens, my_base, L, first, restage, parts);
    else
        stage_rows<HIDDEN, TOPK, T, false>(x, scales, topk_idx, topk_weights, num_tokens, my_base, L, first, restage, 1);
}

// The source's part of a dispatch, every block of the grid: blocks [0, R) lay out, the
// rest stage. Returns false if a wait failed.
template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__device__ __forceinline__ bool send_phase(const SendArgs& a) {
    __shared__ bool last;
    const SymLayout& L = a.peers.layout;
    const uint64_t* peers = a.peers.bases;
    const int rank = a.peers.rank, num_tokens = a.num_tokens;
    const uint64_t timeout_ns = a.peers.timeout_ns;
    Workspace* ws = a.peers.ws;
    Mailbox* mailbox = a.peers.mailbox;
    const Status st = status_of(a.peers);
    // by a staging block: a layout block's releases would wait for this write over PCIe
    if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0 && a.ticket != 0)
        *reinterpret_cast<volatile uint32_t*>(&mailbox->started_ticket) = a.ticket;
    if (failed(st)) return false;
    const uint64_t my_base = peers[rank], id = flag_identity(TAG, L.nonce);
    const uint32_t prev_seq = ws->seqs.dispatch;
    const uint64_t want = make_flag(id, prev_seq + 1);
    if (!block_wait_all<NUM_RANKS>(my_base, L, kStageConsumed, make_flag(id, prev_seq), timeout_ns, st, kPhaseStage))
        return false;
    if (blockIdx.x < NUM_RANKS) {
        if (a.restage) return true;  // the layout and the counts of an earlier dispatch hold
        const int dst = blockIdx.x;
        layout_rank<NUM_EXPERTS, NUM_RANKS, TOPK, kCopyThreads, true>(
            dst, a.topk_idx, num_tokens, a.is_token_in_rank, a.token_slot, ws->tokens_per_rank, ws->tokens_per_expert,
            sym_ptr<int>(my_base, L.send_index) + static_cast<int64_t>(dst) * L.max_tokens, st,
            a.pad_multiple > 0 ? sym_ptr<int>(my_base, L.stage_pos) : nullptr);
        __syncthreads();
        if (threadIdx.x == 0) {  // the last sees every layout block's counts and send list
            last = atomic_add_acq_rel_gpu(&ws->layout_done, 1) == NUM_RANKS - 1;
            if (last) ws->layout_done = 0;
        }
        __syncthreads();
        if (last)
            exchange_counts<NUM_EXPERTS, NUM_RANKS>(ws->tokens_per_rank, ws->tokens_per_expert, peers, L, rank, want,
                                                    a.ticket, timeout_ns, st, a.recv_offsets, a.local_expert_counts,
                                                    mailbox, a.pad_multiple, a.expert_offsets, a.expert_base,
                                                    a.sent_counts, &ws->counts_ready);
        return true;
    }
    stage_tokens<HIDDEN, TOPK, T>(static_cast<const T*>(a.x), a.scales, a.topk_idx, a.topk_weights, num_tokens,
                                  my_base, L, NUM_RANKS, a.restage != 0);
    grid_done_post<NUM_RANKS>(&ws->stage_done, gridDim.x - NUM_RANKS, peers, L, kStageReady, rank, want, st);
    return true;
}

// Expert layout: zero every row of recv_x outside a segment's real rows (padding, and the
// rows past the last segment up to the capacity), with weight 0 and scales 0, one warp per expert.
template <int kLocal, int kScales, bool kFp8>
__device__ __forceinline__ void zero_outside_segments(int4* recv_x, int row_vecs, float* recv_weights,
                                                      float* recv_scales, const int* offsets, const int* counts,
                                                      int capacity, int warp, int num_warps, int lane) {
    for (int e = warp; e <= kLocal; e += num_warps) {
        const int first = e < kLocal ? offsets[e] + counts[e] : offsets[kLocal];
        const int end = min(e < kLocal ? offsets[e + 1] : capacity, capacity);
        for (int j = first; j < end; ++j) {
            for (int v = lane; v < row_vecs; v += kWarpSize)
                st_stream(recv_x + static_cast<int64_t>(j) * row_vecs + v, make_int4(0, 0, 0, 0));
            if (recv_weights != nullptr && lane == 0) recv_weights[j] = 0.0f;
            if constexpr (kFp8)
                if (recv_scales != nullptr)
                    for (int i = lane; i < kScales; i += kWarpSize) recv_scales[static_cast<int64_t>(j) * kScales + i] = 0.0f;
        }
    }
}

// loads in flight per lane of the pull: a row in about one round trip over NVLink
template <typename T>
constexpr int kPullUnroll = sizeof(T) == 1 ? 16 : 8;

// The pull's rows, chunk by chunk, `parts` warps per chunk (each a slice of its rows): lane
// i looks up the token of the chunk's i-th row first, so no row waits on a remote index read;
// the lead (slice 0) also writes the rows' ids, weights and scales.
template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, bool kSplit>
__device__ __forceinline__ void pull_rows(const PullArgs& a, const PeerChunks<NUM_RANKS>& chunks, const int* offsets,
                                          int parts, int warp, int num_warps) {
    constexpr bool kFp8 = sizeof(T) == 1;
    constexpr int kScales = HIDDEN / kScaleBlock;
    constexpr int kLocal = NUM_EXPERTS / NUM_RANKS;
    constexpr int kScalesPerLane = kFp8 ? (kScales + kWarpSize - 1) / kWarpSize : 1;
    constexpr int kUnroll = kPullUnroll<T>;
    static_assert(TOPK <= kWarpSize, "one lane per top-k entry");
    const SymLayout& L = a.peers.layout;
    const uint64_t* peers = a.peers.bases;
    const int rank = a.peers.rank, capacity = a.capacity, lane = threadIdx.x % kWarpSize;
    const bool restage = a.restage != 0, expert = a.pair_rows != nullptr;
    const bool scaled = kFp8 && !restage;  // restaged rows are bf16 gradients: no scales
    const int row_vecs = HIDDEN * (restage ? 2 : static_cast<int>(sizeof(T))) / 16;
    int4* __restrict__ recv_x = static_cast<int4*>(a.recv_x);
    float* __restrict__ recv_scales = a.recv_scales;
    int64_t* __restrict__ recv_idx = a.recv_idx;
    float* __restrict__ recv_weights = a.recv_weights;
    const RowSlices<kSplit> slices(parts, row_vecs);
    for (int item = warp; item < chunks.count * slices.parts(); item += num_warps) {
        const int c = slices.row(item), part = slices.part(item);
        const int src = chunks.peer(c), begin = chunks.begin(c), rows_here = chunks.end(c) - begin;
        const bool lead = part == 0;
        if (rows_here <= 0) continue;
        const uint64_t base = peers[src];
        int my_token = 0;
        if (lane < rows_here) {
            my_token = restage ? a.recv_token[begin + lane]
                               : sym_ptr<const int>(base, L.send_index)[rank * L.max_tokens + (begin + lane - offsets[src])];
            if (!restage && lead) a.recv_token[begin + lane] = my_token;
        }
        for (int i = 0; i < rows_here; ++i) {
            const int j = begin + i;
            const int t = __shfl_sync(0xffffffffu, my_token, i);
            int64_t id = -1;
            float wt = 0.0f, sc[kScalesPerLane];
            if (lane < TOPK && !restage && (lead || expert)) {  // issued before the row's, to share its round trip
                id = sym_ptr<const int64_t>(base, L.stage_idx)[t * TOPK + lane];
                wt = sym_ptr<const float>(base, L.stage_weights)[t * TOPK + lane];
            }
            if (scaled && lead) {
                const float* s = sym_ptr<const float>(base, L.stage_scales) + t * kScales;
#pragma unroll
                for (int u = 0; u < kScalesPerLane; ++u)
                    if (lane + u * kWarpSize < kScales) sc[u] = s[lane + u * kWarpSize];
            }
            const int64_t local = id - rank * kLocal;
            const bool hit = lane < TOPK && local >= 0 && local < kLocal;
            int dest = j;  // where this lane's pair (expert layout) or the row (token layout) lands
            if (expert && lane < TOPK) {
                if (restage) {
                    dest = a.pair_rows[static_cast<int64_t>(j) * TOPK + lane];
                } else {
                    dest = hit ? a.expert_base[src * kLocal + local] + sym_ptr<const int>(base, L.stage_pos)[t * TOPK + lane] : -1;
                    // past the capacity: dropped (reported above, and by the source at combine)
                    dest = dest < capacity ? dest : kDroppedPair;
                    if (lead) a.pair_rows[static_cast<int64_t>(j) * TOPK + lane] = dest;
                }
            }
            int rows[TOPK];  // token layout: only rows[0] = j
#pragma unroll
            for (int k = 0; k < TOPK; ++k) rows[k] = expert ? __shfl_sync(0xffffffffu, dest, k) : k == 0 ? j : -1;
            const int4* from = sym_ptr<const int4>(base, L.stage_x) + static_cast<int64_t>(t) * row_vecs;
            const int v0 = slices.begin(part), v1 = slices.end(part, row_vecs);
            if (expert)
                warp_copy_to_rows<kUnroll, TOPK>(recv_x, rows, row_vecs, from, v0, v1, lane);
            else
                warp_copy<kUnroll>(recv_x + static_cast<int64_t>(j) * row_vecs, from, v0, v1, lane);
            if (restage || !lead) continue;
            if (!expert && lane < TOPK) {
                recv_idx[static_cast<int64_t>(j) * TOPK + lane] = hit ? local : -1;
                recv_weights[static_cast<int64_t>(j) * TOPK + lane] = hit ? wt : 0.0f;
            }
            if (expert && lane < TOPK && dest >= 0) recv_weights[dest] = wt;
            if (scaled) {
#pragma unroll
                for (int r = 0; r < (expert ? TOPK : 1); ++r) {
                    if (rows[r] < 0) continue;
#pragma unroll
                    for (int u = 0; u < kScalesPerLane; ++u)
                        if (lane + u * kWarpSize < kScales)
                            recv_scales[static_cast<int64_t>(rows[r]) * kScales + lane + u * kWarpSize] = sc[u];
                }
            }
        }
    }
}

// The destination's part, every block of the grid. `after_send`: the same grid ran
// send_phase just before (one launch for both), so first wait until its count exchange
// has published the receive layout; a launch of the pull alone starts after it anyway.
template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__device__ __forceinline__ void pull_phase(const PullArgs& a, bool after_send) {
    constexpr bool kFp8 = sizeof(T) == 1;
    constexpr int kScales = HIDDEN / kScaleBlock;
    constexpr int kLocal = NUM_EXPERTS / NUM_RANKS;
    __shared__ int offsets[NUM_RANKS + 1];
    const SymLayout& L = a.peers.layout;
    const uint64_t* peers = a.peers.bases;
    const int rank = a.peers.rank, capacity = a.capacity;
    const bool restage = a.restage != 0, expert = a.pair_rows != nullptr;
    const bool scaled = kFp8 && !restage;  // restaged rows are bf16 gradients: no scales
    const int row_vecs = HIDDEN * (restage ? 2 : static_cast<int>(sizeof(T))) / 16;
    Workspace* ws = a.peers.ws;
    int4* __restrict__ recv_x = static_cast<int4*>(a.recv_x);
    float* __restrict__ recv_scales = a.recv_scales;
    int64_t* __restrict__ recv_idx = a.recv_idx;
    float* __restrict__ recv_weights = a.recv_weights;
    const Status st = status_of(a.peers);
    if (failed(st)) return;  // the count exchange failed: nothing valid to pull
    const uint32_t seq = ws->seqs.dispatch + 1;
    const uint64_t want = make_flag(flag_identity(TAG, L.nonce), seq);
    if (!block_wait_all<NUM_RANKS>(peers[rank], L, kStageReady, want, a.peers.timeout_ns, st, kPhasePull))
        return;
    if (after_send) {
        const bool ok = threadIdx.x != 0 ||
                         wait_flag(&ws->counts_ready, want, a.peers.timeout_ns, st, kPhaseNotify, rank, true);
        if (__syncthreads_or(!ok)) return;
    }
    if (threadIdx.x <= NUM_RANKS) offsets[threadIdx.x] = capacity < 0 ? 0 : a.recv_offsets[threadIdx.x];
    __syncthreads();
    // token layout: row j lands at j; expert layout: each pair of row j at its segment's row
    const int rows_needed = expert ? (capacity < 0 ? 0 : a.expert_offsets[kLocal]) : offsets[NUM_RANKS];
    if (blockIdx.x == 0 && threadIdx.x == 0 && rows_needed > capacity && capacity >= 0 && !restage)
        report(st, 2, rows_needed);  // rows that did not fit
    const int total = expert ? min(offsets[NUM_RANKS], a.token_rows) : min(offsets[NUM_RANKS], max(capacity, 0));
    const int lane = threadIdx.x % kWarpSize;
    // the fused dispatch's layout blocks come to the pull last (the last of them exchanges
    // the counts first), so the first rows go to warps that are waiting already
    const int block = after_send ? (blockIdx.x + gridDim.x - NUM_RANKS) % gridDim.x : blockIdx.x;
    const int warp = (block * blockDim.x + threadIdx.x) / kWarpSize;
    const int num_warps = gridDim.x * blockDim.x / kWarpSize;
    // Rows are taken up to 32 at a time per warp (fewer when there are few, so every warp
    // gets some; fewer rows than warps: a slice of a row each), interleaved over the sources.
    const PeerChunks<NUM_RANKS> chunks(offsets, total, rank, num_warps, kWarpSize, false);
    const int parts = row_parts(chunks.count, num_warps, row_vecs, kPullUnroll<T> * kWarpSize);
    // fp8 rows up to hidden 8192 are one round of loads already, and a split copy in the fp8
    // kernel would cost its unsplit one registers (spills at the 128-register limit)
    if (!kFp8 && parts > 1)
        pull_rows<HIDDEN, NUM_EXPERTS, NUM_RANKS, TOPK, T, !kFp8>(a, chunks, offsets, parts, warp, num_warps);
    else
        pull_rows<HIDDEN, NUM_EXPERTS, NUM_RANKS, TOPK, T, false>(a, chunks, offsets, 1, warp, num_warps);
    if (expert && capacity >= 0) {
        zero_outside_segments<kLocal, kScales, kFp8>(recv_x, row_vecs, restage ? nullptr : recv_weights,
                                                     scaled ? recv_scales : nullptr, a.expert_offsets, a.expert_counts,
                                                     capacity, warp, num_warps, lane);
    } else {  // token layout: rows past the received count are zero (no NaN reaches a GEMM), ids -1
        for (int j = total + warp; j < max(capacity, 0); j += num_warps) {
            for (int v = lane; v < row_vecs; v += kWarpSize)
                st_stream(recv_x + static_cast<int64_t>(j) * row_vecs + v, make_int4(0, 0, 0, 0));
            if (scaled)
                for (int i = lane; i < kScales; i += kWarpSize)
                    recv_scales[static_cast<int64_t>(j) * kScales + i] = 0.0f;
        }
        if (!restage)
            for (int64_t i = static_cast<int64_t>(total) * TOPK + block * blockDim.x + threadIdx.x;
                 i < static_cast<int64_t>(max(capacity, 0)) * TOPK; i += gridDim.x * blockDim.x) {
                recv_idx[i] = -1;
                recv_weights[i] = 0.0f;
            }
    }
    grid_done_post<NUM_RANKS>(&ws->pull_done, gridDim.x, peers, L, kStageConsumed, rank, want, st, &ws->seqs.dispatch,
                              seq);
}

// One kernel, launched for the phases a.phases names: kSendPhase (on the source), then
// kPullPhase (on the destination) once the host has the counts and the outputs; or both
// in one launch, for non-blocking dispatches of few tokens, where a launch costs about as
// much as the work. Then pull blocks wait for flags that send blocks of the same grid
// post, so all blocks must be resident at once (checked at first use).
template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__global__ void __launch_bounds__(kCopyThreads) dispatch_kernel(const __grid_constant__ DispatchArgs a) {
    const bool send = (a.phases & kSendPhase) != 0;
    if (send && !send_phase<HIDDEN, NUM_EXPERTS, NUM_RANKS, TOPK, T, TAG>(a.send)) return;
    if (a.phases & kPullPhase) pull_phase<HIDDEN, NUM_EXPERTS, NUM_RANKS, TOPK, T, TAG>(a.pull, send);
}

}  // namespace ep_jit
