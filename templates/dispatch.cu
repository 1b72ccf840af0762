// Dispatch: stage locally, then every destination pulls what it needs over NVLink.
//
// stage_kernel   copies this rank's tokens (rows, scales, top-k) into its own
//                symmetric buffer and writes, per destination, the list of token
//                indices in slot order. It first waits until every peer has pulled
//                the previous dispatch's stage.
// pull_kernel    on the destination: row j of the output is row j - offset[s] of
//                source s's list, so rows come out ordered by (source rank, source
//                token index). Reads are 16-byte loads from the peer's buffer, one
//                warp per row; chunks of 32 rows alternate between sources so every
//                link is busy at once. Expert ids become
//                local ids (others -1, weight 0). Rows past the received count, up
//                to the capacity, are marked empty (-1, 0); rows past the capacity are
//                reported in status word 2 and not copied. capacity < 0 abandons the
//                dispatch (a rank passed bad ids): nothing is copied, the stage is
//                released.
#include "ep_common.cuh"

namespace ep_jit {

constexpr int kCopyThreads = 512;

template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__global__ void __launch_bounds__(kCopyThreads)
stage_kernel(const T* __restrict__ x, const float* __restrict__ scales, const int64_t* __restrict__ topk_idx,
             const float* __restrict__ topk_weights, const int* __restrict__ token_slot, int num_tokens,
             const uint64_t* __restrict__ peers, SymLayout L, int rank, const Sequences* seqs, uint64_t timeout_ns,
             Status st) {
    constexpr bool kFp8 = sizeof(T) == 1;
    constexpr int kVecs = HIDDEN * sizeof(T) / 16;
    constexpr int kScales = HIDDEN / kScaleBlock;
    static_assert(HIDDEN * sizeof(T) % 16 == 0, "rows must be whole 16-byte vectors");
    if (failed(st)) return;
    const uint64_t my_base = peers[rank];
    const int prev_seq = seqs->dispatch;
    if (prev_seq != 0 && !block_wait_all<NUM_RANKS>(my_base, L, kStageConsumed, make_flag(TAG, prev_seq),
                                                     timeout_ns, st, kPhaseStage))
        return;

    const int lane = threadIdx.x % kWarpSize;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize;
    const int num_warps = gridDim.x * blockDim.x / kWarpSize;
    int4* stage_x = sym_ptr<int4>(my_base, L.stage_x);
    int64_t* stage_idx = sym_ptr<int64_t>(my_base, L.stage_idx);
    float* stage_w = sym_ptr<float>(my_base, L.stage_weights);
    for (int t = warp; t < num_tokens; t += num_warps) {
        warp_copy(stage_x + static_cast<int64_t>(t) * kVecs, reinterpret_cast<const int4*>(x) + static_cast<int64_t>(t) * kVecs,
                  kVecs, lane);
        for (int k = lane; k < TOPK; k += kWarpSize) {
            stage_idx[t * TOPK + k] = topk_idx[t * TOPK + k];
            stage_w[t * TOPK + k] = topk_weights[t * TOPK + k];
        }
        if constexpr (kFp8) {
            float* stage_s = sym_ptr<float>(my_base, L.stage_scales);
            for (int i = lane; i < kScales; i += kWarpSize) stage_s[t * kScales + i] = scales[t * kScales + i];
        }
    }
    int* send_index = sym_ptr<int>(my_base, L.send_index);
    const int64_t pairs = static_cast<int64_t>(num_tokens) * NUM_RANKS;
    for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += gridDim.x * blockDim.x) {
        const int slot = token_slot[i];
        if (slot >= 0) send_index[(i % NUM_RANKS) * L.max_tokens + slot] = static_cast<int>(i / NUM_RANKS);
    }
}

template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__global__ void __launch_bounds__(kCopyThreads)
pull_kernel(T* __restrict__ recv_x, float* __restrict__ recv_scales, int64_t* __restrict__ recv_idx,
            float* __restrict__ recv_weights, int capacity, const int* __restrict__ recv_offsets,
            const uint64_t* __restrict__ peers, SymLayout L, int rank, Sequences* seqs, Status st, int* counter) {
    constexpr bool kFp8 = sizeof(T) == 1;
    constexpr int kVecs = HIDDEN * sizeof(T) / 16;
    constexpr int kScales = HIDDEN / kScaleBlock;
    constexpr int kLocal = NUM_EXPERTS / NUM_RANKS;
    static_assert(TOPK <= kWarpSize, "one lane per top-k entry");
    __shared__ int offsets[NUM_RANKS + 1];
    if (failed(st)) return;  // the count exchange failed: nothing valid to pull
    const int seq = seqs->dispatch + 1;
    if (threadIdx.x <= NUM_RANKS) offsets[threadIdx.x] = capacity < 0 ? 0 : recv_offsets[threadIdx.x];
    __syncthreads();
    if (blockIdx.x == 0 && threadIdx.x == 0 && offsets[NUM_RANKS] > capacity && capacity >= 0)
        report(st, 2, offsets[NUM_RANKS]);  // rows that did not fit
    const int total = min(offsets[NUM_RANKS], max(capacity, 0));
    const int lane = threadIdx.x % kWarpSize;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize;
    const int num_warps = gridDim.x * blockDim.x / kWarpSize;
    // Rows are taken 32 at a time per warp, interleaved over the sources: lane i looks up
    // the token of the chunk's i-th row first, so no row waits on a remote index read.
    const PeerChunks<NUM_RANKS> chunks(offsets, total, rank);
    for (int c = warp; c < chunks.count; c += num_warps) {
        const int src = chunks.peer(c), begin = chunks.begin(c), rows_here = chunks.end(c) - begin;
        if (rows_here <= 0) continue;
        const uint64_t base = peers[src];
        const int my_token = lane < rows_here
            ? sym_ptr<const int>(base, L.send_index)[rank * L.max_tokens + (begin + lane - offsets[src])] : 0;
        for (int i = 0; i < rows_here; ++i) {
            const int j = begin + i;
            const int t = __shfl_sync(0xffffffffu, my_token, i);
            int64_t id = 0;
            float wt = 0.0f;
            if (lane < TOPK) {  // issue the small loads before the row's
                id = sym_ptr<const int64_t>(base, L.stage_idx)[t * TOPK + lane];
                wt = sym_ptr<const float>(base, L.stage_weights)[t * TOPK + lane];
            }
            warp_copy(reinterpret_cast<int4*>(recv_x) + static_cast<int64_t>(j) * kVecs,
                      sym_ptr<const int4>(base, L.stage_x) + static_cast<int64_t>(t) * kVecs, kVecs, lane);
            if (lane < TOPK) {
                const int64_t local = id - rank * kLocal;
                const bool hit = local >= 0 && local < kLocal;
                recv_idx[static_cast<int64_t>(j) * TOPK + lane] = hit ? local : -1;
                recv_weights[static_cast<int64_t>(j) * TOPK + lane] = hit ? wt : 0.0f;
            }
            if constexpr (kFp8) {
                const float* s = sym_ptr<const float>(base, L.stage_scales) + t * kScales;
                for (int k = lane; k < kScales; k += kWarpSize) recv_scales[static_cast<int64_t>(j) * kScales + k] = s[k];
            }
        }
    }
    for (int64_t i = static_cast<int64_t>(total) * TOPK + blockIdx.x * blockDim.x + threadIdx.x;
         i < static_cast<int64_t>(max(capacity, 0)) * TOPK; i += gridDim.x * blockDim.x) {
        recv_idx[i] = -1;
        recv_weights[i] = 0.0f;
    }
    grid_done_post<NUM_RANKS>(counter, peers, L, kStageConsumed, rank, make_flag(TAG, seq), &seqs->dispatch, seq);
}

}  // namespace ep_jit
