// Combine: expert ranks push their outputs back over NVLink while each source rank
// reduces the rows of every token in fp32, in rank order (deterministic), as they arrive.
//
// combine_kernel  every block has kPushWarps pushing warps and the rest reducing.
//   push    on expert rank r: output row j came from source s at slot j - offset[s]; it
//           is written to s's buffer at combine[r][slot] with 16-byte stores, in chunks of
//           up to kCombineChunkRows rows (fewer when r holds few of s's rows, so every
//           pushing warp has some), each flagged in s's combine_ready when in place. Waits
//           first until every source has reduced the previous combine. Rows that r dropped
//           for its capacity in dispatch are written as zeros, so they add nothing, and
//           their number (in the expert layout, of pairs dropped) is added to s's
//           combine_dropped[r], which s reports (status word 3).
//           Expert layout: the row pushed for token row j is sum_k w_k * y[pair_rows[j, k]]
//           over j's pairs on r (fp32, k order, rounded to bf16 once), so the pairs of a
//           token cross NVLink as one row. With scalars, each row also carries K fp32 values
//           (a gradient per pair), summed over ranks into scalars_out [T, K]; with with_rows 0,
//           only they move (the weights' gradient of an fp8 dispatch).
//   reduce  on source s: out[t] = sum over r with token_slot[t, r] >= 0 of
//           combine[r][token_slot[t, r]], accumulated in fp32, once the chunks holding
//           those rows are flagged. Warps take tokens in order from a queue, so the reduce
//           follows the pushes closely; pushing warps join it when their chunks are done.
#include "ep_common.cuh"

namespace ep_jit {

constexpr int kPushWarps = 12;       // of the block's 16; the pushes are bound by NVLink, not by warps
constexpr int kTokensPerTake = 4;    // tokens a reducing warp takes from the queue at once, at most
using bf16 = __nv_bfloat16;

// Flag of chunk `chunk` of the rows `peer` pushes to this rank (at most max_tokens chunks).
__device__ __forceinline__ uint64_t* chunk_flag(uint64_t base, const SymLayout& L, int peer, int chunk) {
    return sym_ptr<uint64_t>(base, L.combine_ready) + static_cast<int64_t>(peer) * L.max_tokens + chunk;
}

// Rows per flagged chunk of the `rows` rows between one pusher and one source: both ends
// know `rows` (the pusher received them, the source sent them) and the grid, and size the
// chunks with PeerChunks::peer_size; few rows make small chunks, so every pushing warp gets some.
template <int NUM_RANKS>
__device__ __forceinline__ int combine_chunk_rows(int rows) {
    return PeerChunks<NUM_RANKS>::peer_size(rows, gridDim.x * kPushWarps, kCombineChunkRows);
}

// What row j carries besides its bf16 row: the pairs' scalars (lane k < TOPK holds k's).
__device__ __forceinline__ float pair_scalar(const CombineArgs& a, int j, int k, int pair_row, int topk) {
    if (a.pair_rows != nullptr) return pair_row >= 0 ? a.scalars[pair_row] : 0.0f;
    return a.recv_idx[static_cast<int64_t>(j) * topk + k] >= 0 ? a.scalars[static_cast<int64_t>(j) * topk + k] : 0.0f;
}

// Token row j as it is pushed: y[j] (token layout) or the weighted sum of its pairs' rows.
template <int HIDDEN, int TOPK>
__device__ __forceinline__ void push_row(int4* to, const CombineArgs& a, int j, int lane) {
    constexpr int kVecs = HIDDEN * sizeof(bf16) / 16;
    const int4* y = static_cast<const int4*>(a.y);
    if (a.pair_rows == nullptr) {
        warp_copy(to, y + static_cast<int64_t>(j) * kVecs, 0, kVecs, lane);
        return;
    }
    const int mine = lane < TOPK ? a.pair_rows[static_cast<int64_t>(j) * TOPK + lane] : -1;
    const float w = mine >= 0 && a.pair_weights != nullptr ? a.pair_weights[mine] : 1.0f;
    const int4* from[TOPK];
    float weights[TOPK];
#pragma unroll
    for (int k = 0; k < TOPK; ++k) {
        const int row = __shfl_sync(0xffffffffu, mine, k);
        weights[k] = __shfl_sync(0xffffffffu, w, k);
        from[k] = row < 0 ? nullptr : y + static_cast<int64_t>(row) * kVecs;
    }
    warp_sum_rows<kVecs, TOPK>(to, from, lane, weights);
}

// Push this warp's share of the rows: every chunk that holds slots of its source gets its
// flag. Rows past `total` (dropped by a too-small capacity; y has no row for them) are
// pushed as zeros; their count and that of the rows' dropped pairs is added to the source's
// combine_dropped before the chunk's flag.
template <int HIDDEN, int NUM_RANKS, int TOPK>
__device__ __forceinline__ void push_rows(const CombineArgs& a, const int* offsets, int total,
                                          const uint64_t* __restrict__ peers, const SymLayout& L, int rank,
                                          uint64_t want, int warp, int num_warps, int lane) {
    constexpr int kVecs = HIDDEN * sizeof(bf16) / 16;
    // sized as combine_chunk_rows sizes them on the source
    const PeerChunks<NUM_RANKS> chunks(offsets, total, rank, gridDim.x * kPushWarps, kCombineChunkRows, true);
    for (int c = warp; c < chunks.count; c += num_warps) {
        const int dst = chunks.peer(c), begin = chunks.begin(c), end = chunks.end(c);
        const int stop = min(begin + chunks.size(dst), offsets[dst + 1]);
        if (begin >= stop) continue;
        const int64_t first_slot = static_cast<int64_t>(rank) * L.max_tokens + (begin - offsets[dst]);
        int4* to = sym_ptr<int4>(peers[dst], L.combine) + first_slot * kVecs;
        float* scalars = sym_ptr<float>(peers[dst], L.combine_scalars) + first_slot * TOPK;
        int lost_pairs = 0;  // expert layout: pairs of these rows this rank dropped for its capacity
        for (int j = begin; j < stop; ++j, to += kVecs, scalars += TOPK) {
            if (j < end) {
                if (a.with_rows) push_row<HIDDEN, TOPK>(to, a, j, lane);
                if (a.pair_rows != nullptr) {
                    const bool dropped = lane < TOPK && a.pair_rows[static_cast<int64_t>(j) * TOPK + lane] == kDroppedPair;
                    lost_pairs += __popc(__ballot_sync(0xffffffffu, dropped));
                }
            } else if (a.with_rows) {
                for (int v = lane; v < kVecs; v += kWarpSize) st_stream(to + v, make_int4(0, 0, 0, 0));
            }
            if (a.scalars_out != nullptr && lane < TOPK) {
                const int pair_row = a.pair_rows != nullptr && j < end ? a.pair_rows[static_cast<int64_t>(j) * TOPK + lane] : -1;
                scalars[lane] = j < end ? pair_scalar(a, j, lane, pair_row, TOPK) : 0.0f;
            }
        }
        __syncwarp();  // orders every lane's stores before lane 0's release (a fence per lane: 2 % slower)
        if (lane == 0) {
            const int dropped = stop - max(begin, end) + lost_pairs;  // rows past `total`, and pairs
            if (dropped != 0) atomicAdd_system(sym_ptr<int>(peers[dst], L.combine_dropped) + rank, dropped);
            st_release_sys(chunk_flag(peers[dst], L, rank, c / NUM_RANKS), want);
        }
    }
}

// Reduce tokens taken from the queue until it is empty; false if a wait failed.
template <int HIDDEN, int NUM_RANKS, int TOPK>
__device__ __forceinline__ bool reduce_tokens(bf16* __restrict__ out, bool with_rows,
                                              float* __restrict__ scalars_out,
                                              const int* __restrict__ token_slot, const int* __restrict__ sent,
                                              int num_tokens, uint64_t my_base, const SymLayout& L, int* queue,
                                              uint64_t want, uint64_t timeout_ns, const Status& st, int lane) {
    constexpr int kVecs = HIDDEN * sizeof(bf16) / 16;
    constexpr int kPerLane = (NUM_RANKS + kWarpSize - 1) / kWarpSize;
    const int4* rows = sym_ptr<const int4>(my_base, L.combine);
    int seen[kPerLane];  // lane l: the last chunk of peer l + i * 32 found in place
    int size[kPerLane];  // and the rows per chunk of that peer's pushes
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        const int r = lane + i * kWarpSize;
        seen[i] = -1;
        size[i] = r < NUM_RANKS ? combine_chunk_rows<NUM_RANKS>(sent[r]) : 1;
    }
    // a few tokens per take, fewer when there are few, so that every warp gets some (fewer
    // tokens than warps: a slice of a token's row each, the scalars with slice 0)
    const int workers = gridDim.x * blockDim.x / kWarpSize;
    const RowSlices<true> slices(row_parts(num_tokens, with_rows ? workers : 0, kVecs, kSumUnroll<NUM_RANKS> * kWarpSize),
                                 kVecs);
    const int items = num_tokens * slices.parts();
    const int take = chunk_rows_for(items, workers, kTokensPerTake);
    for (;;) {
        int first = lane == 0 ? atomicAdd(queue, take) : 0;
        first = __shfl_sync(0xffffffffu, first, 0);
        if (first >= items) return true;
        for (int item = first; item < min(first + take, items); ++item) {
            const int t = slices.row(item), part = slices.part(item);
            const int* slots = token_slot + static_cast<int64_t>(t) * NUM_RANKS;
            bool arrived = true, waited = false;
#pragma unroll
            for (int i = 0; i < kPerLane; ++i) {
                const int r = lane + i * kWarpSize;
                const int slot = r < NUM_RANKS ? slots[r] : -1;
                if (slot >= 0 && slot / size[i] != seen[i]) {
                    // exact: a chunk flag is not posted every round, and never ahead of this one
                    arrived = arrived && wait_flag(chunk_flag(my_base, L, r, slot / size[i]), want, timeout_ns, st,
                                                   kPhaseCombineReduce, r, true);
                    seen[i] = slot / size[i];
                    waited = true;
                }
            }
            if (!__all_sync(0xffffffffu, arrived)) return false;
            // after a new chunk, the lanes meet and every lane fences, so none reads rows
            // before the flag that another lane acquired
            if (__any_sync(0xffffffffu, waited)) {
                __syncwarp();
                asm volatile("fence.acq_rel.sys;" ::: "memory");
            }
            const int4* from[NUM_RANKS];
#pragma unroll
            for (int r = 0; r < NUM_RANKS; ++r) {
                const int slot = slots[r];
                from[r] = slot < 0 ? nullptr : rows + (static_cast<int64_t>(r) * L.max_tokens + slot) * kVecs;
            }
            if (with_rows)
                warp_sum_rows<kVecs, NUM_RANKS>(reinterpret_cast<int4*>(out) + static_cast<int64_t>(t) * kVecs, from,
                                                lane, nullptr, slices.begin(part), slices.end(part, kVecs));
            if (scalars_out != nullptr && part == 0 && lane < TOPK) {  // in rank order, like the rows
                const float* values = sym_ptr<const float>(my_base, L.combine_scalars);
                float sum = 0.0f;
                for (int r = 0; r < NUM_RANKS; ++r)
                    if (slots[r] >= 0) sum += values[(static_cast<int64_t>(r) * L.max_tokens + slots[r]) * TOPK + lane];
                scalars_out[static_cast<int64_t>(t) * TOPK + lane] = sum;
            }
        }
    }
}

template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__global__ void __launch_bounds__(kCopyThreads) combine_kernel(const __grid_constant__ CombineArgs a) {
    __shared__ int offsets[NUM_RANKS + 1];
    const SymLayout& L = a.peers.layout;
    const uint64_t* peers = a.peers.bases;
    const int rank = a.peers.rank;
    const uint64_t timeout_ns = a.peers.timeout_ns;
    Workspace* ws = a.peers.ws;
    const Status st = status_of(a.peers);
    if (failed(st)) return;
    const uint32_t seq = ws->seqs.combine + 1;
    const uint64_t id = flag_identity(TAG, L.nonce), want = make_flag(id, seq);
    if (!block_wait_all<NUM_RANKS>(peers[rank], L, kCombineConsumed, make_flag(id, seq - 1), timeout_ns, st,
                                   kPhaseCombinePush))
        return;
    if (threadIdx.x <= NUM_RANKS) offsets[threadIdx.x] = a.recv_offsets[threadIdx.x];
    __syncthreads();
    const int lane = threadIdx.x % kWarpSize, warp_in_block = threadIdx.x / kWarpSize;
    if (warp_in_block < kPushWarps)
        push_rows<HIDDEN, NUM_RANKS, TOPK>(a, offsets, min(offsets[NUM_RANKS], a.num_rows), peers, L, rank, want,
                                           blockIdx.x * kPushWarps + warp_in_block, gridDim.x * kPushWarps, lane);
    reduce_tokens<HIDDEN, NUM_RANKS, TOPK>(static_cast<bf16*>(a.out), a.with_rows != 0, a.scalars_out, a.token_slot,
                                           a.sent_counts, a.num_tokens, peers[rank], L, &ws->combine_queue, want,
                                           timeout_ns, st, lane);
    if (!last_block_arrives(&ws->combine_done, gridDim.x)) return;
    ws->combine_queue = 0;
    // every chunk has been acquired by some block, so what the pushers dropped is in place
    int* dropped = sym_ptr<int>(peers[rank], L.combine_dropped);
    int lost = 0;
    for (int p = 0; p < NUM_RANKS; ++p) {
        lost += ld_volatile(dropped + p);
        dropped[p] = 0;  // before the flag below: no peer pushes the next combine until then
    }
    if (lost != 0) report(st, 3, lost);
    if (post_all<NUM_RANKS>(peers, L, kCombineConsumed, rank, want, st)) ws->seqs.combine = seq;
}

}  // namespace ep_jit
