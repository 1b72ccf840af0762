// Dispatch and combine through the framework's all_to_all, for groups whose members do
// not share one NVLink domain. The kernels only permute: the bytes move in NCCL.
//
// count_kernel  from every member's counts row (gathered [R][R + E + 4]: tokens per
//               destination, (token, expert) pairs per expert, the layout kernel's status
//               words), this rank's send and receive offsets and its tokens per local
//               expert; it also copies the rows to mapped host memory and then writes the
//               ticket, so the host learns the split sizes without synchronising the stream.
// pack_kernel   token t goes to destination r as row send_offsets[r] + slot(t, r) of
//               send_x (the x row) and of send_meta (fp8 scales, top-k ids made local to r,
//               others -1, and the matching weights, others 0). The rows for r stay in
//               token order, so after the all_to_all the receiver holds them ordered by
//               (source rank, token index): x lands in recv_x itself.
// unpack_kernel meta rows -> recv_scales, recv_topk_idx (int64), recv_topk_weights.
// sum_kernel    combine: out[t] = sum over r of the row that r sent back for t, in fp32.
#include "ep_common.cuh"

namespace ep_jit {

// One meta row: [scales (fp8 only) | top-k ids (int32) | top-k weights], padded to 16
// bytes. ep_jit/kernels/args.py meta_row_bytes() computes the same size.
template <int HIDDEN, int TOPK, typename T>
struct MetaRow {
    static constexpr int kScales = sizeof(T) == 1 ? HIDDEN / kScaleBlock : 0;
    static constexpr int kIdxAt = kScales * 4;
    static constexpr int kWeightsAt = kIdxAt + TOPK * 4;
    static constexpr int kBytes = (kWeightsAt + TOPK * 4 + 15) / 16 * 16;
};

template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__global__ void __launch_bounds__(kCopyThreads) count_kernel(const __grid_constant__ CountArgs a) {
    const int* __restrict__ gathered = a.gathered;
    int* __restrict__ send_offsets = a.send_offsets;
    int* __restrict__ recv_offsets = a.recv_offsets;
    const int rank = a.rank;
    constexpr int kLocal = NUM_EXPERTS / NUM_RANKS;
    constexpr int kRow = NUM_RANKS + NUM_EXPERTS + kStatusWords;
    if (threadIdx.x == 0) {
        int sent = 0, received = 0;
        for (int r = 0; r < NUM_RANKS; ++r) {
            send_offsets[r] = sent;
            recv_offsets[r] = received;
            sent += gathered[rank * kRow + r];
            received += gathered[r * kRow + rank];
        }
        send_offsets[NUM_RANKS] = sent;
        recv_offsets[NUM_RANKS] = received;
    }
    for (int e = threadIdx.x; e < kLocal; e += blockDim.x) {
        int sum = 0;
        for (int r = 0; r < NUM_RANKS; ++r) sum += gathered[r * kRow + NUM_RANKS + rank * kLocal + e];
        a.local_expert_counts[e] = sum;
    }
    for (int i = threadIdx.x; i < NUM_RANKS * kRow; i += blockDim.x) a.host[4 + i] = gathered[i];
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        *reinterpret_cast<volatile uint32_t*>(a.host) = a.ticket;
    }
}

template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__global__ void __launch_bounds__(kCopyThreads) pack_kernel(const __grid_constant__ PackArgs a) {
    const T* __restrict__ x = static_cast<const T*>(a.x);
    const float* __restrict__ scales = a.scales;
    const int64_t* __restrict__ topk_idx = a.topk_idx;
    const float* __restrict__ topk_weights = a.topk_weights;
    const int* __restrict__ token_slot = a.token_slot;
    const int* __restrict__ send_offsets = a.send_offsets;
    T* __restrict__ send_x = static_cast<T*>(a.send_x);
    char* __restrict__ send_meta = a.send_meta;
    const int num_tokens = a.num_tokens;
    using Meta = MetaRow<HIDDEN, TOPK, T>;
    constexpr int kVecs = HIDDEN * sizeof(T) / 16;
    constexpr int kLocal = NUM_EXPERTS / NUM_RANKS;
    static_assert(TOPK <= kWarpSize, "one lane per top-k entry");
    const int lane = threadIdx.x % kWarpSize;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize;
    const int num_warps = gridDim.x * blockDim.x / kWarpSize;
    for (int t = warp; t < num_tokens; t += num_warps) {
        const int64_t id = lane < TOPK ? topk_idx[static_cast<int64_t>(t) * TOPK + lane] : -1;
        const float wt = lane < TOPK ? topk_weights[static_cast<int64_t>(t) * TOPK + lane] : 0.0f;
        for (int r = 0; r < NUM_RANKS; ++r) {
            const int slot = token_slot[static_cast<int64_t>(t) * NUM_RANKS + r];
            if (slot < 0) continue;
            const int64_t row = send_offsets[r] + slot;
            warp_copy(reinterpret_cast<int4*>(send_x) + row * kVecs,
                      reinterpret_cast<const int4*>(x) + static_cast<int64_t>(t) * kVecs, 0, kVecs, lane);
            char* meta = send_meta + row * Meta::kBytes;
            for (int i = lane; i < Meta::kScales; i += kWarpSize)
                reinterpret_cast<float*>(meta)[i] = scales[static_cast<int64_t>(t) * Meta::kScales + i];
            if (lane < TOPK) {
                const int64_t local = id - static_cast<int64_t>(r) * kLocal;
                const bool hit = id >= 0 && id < NUM_EXPERTS && local >= 0 && local < kLocal;
                reinterpret_cast<int*>(meta + Meta::kIdxAt)[lane] = hit ? static_cast<int>(local) : -1;
                reinterpret_cast<float*>(meta + Meta::kWeightsAt)[lane] = hit ? wt : 0.0f;
            }
        }
    }
}

template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__global__ void __launch_bounds__(kCopyThreads) unpack_kernel(const __grid_constant__ UnpackArgs a) {
    const char* __restrict__ recv_meta = a.recv_meta;
    float* __restrict__ recv_scales = a.recv_scales;
    int64_t* __restrict__ recv_idx = a.recv_idx;
    float* __restrict__ recv_weights = a.recv_weights;
    const int num_rows = a.num_rows;
    using Meta = MetaRow<HIDDEN, TOPK, T>;
    const int lane = threadIdx.x % kWarpSize;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize;
    const int num_warps = gridDim.x * blockDim.x / kWarpSize;
    for (int j = warp; j < num_rows; j += num_warps) {
        const char* meta = recv_meta + static_cast<int64_t>(j) * Meta::kBytes;
        for (int i = lane; i < Meta::kScales; i += kWarpSize)
            recv_scales[static_cast<int64_t>(j) * Meta::kScales + i] = reinterpret_cast<const float*>(meta)[i];
        if (lane < TOPK) {
            recv_idx[static_cast<int64_t>(j) * TOPK + lane] = reinterpret_cast<const int*>(meta + Meta::kIdxAt)[lane];
            recv_weights[static_cast<int64_t>(j) * TOPK + lane] =
                reinterpret_cast<const float*>(meta + Meta::kWeightsAt)[lane];
        }
    }
}

template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__global__ void __launch_bounds__(kCopyThreads) sum_kernel(const __grid_constant__ SumArgs a) {
    const __nv_bfloat16* __restrict__ returned = static_cast<const __nv_bfloat16*>(a.returned);
    const int* __restrict__ token_slot = a.token_slot;
    const int* __restrict__ send_offsets = a.send_offsets;
    __nv_bfloat16* __restrict__ out = static_cast<__nv_bfloat16*>(a.out);
    const int num_tokens = a.num_tokens;
    constexpr int kVecs = HIDDEN * sizeof(__nv_bfloat16) / 16;
    const int lane = threadIdx.x % kWarpSize;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize;
    const int num_warps = gridDim.x * blockDim.x / kWarpSize;
    const int4* rows = reinterpret_cast<const int4*>(returned);
    for (int t = warp; t < num_tokens; t += num_warps) {
        const int4* from[NUM_RANKS];
#pragma unroll
        for (int r = 0; r < NUM_RANKS; ++r) {
            const int slot = token_slot[static_cast<int64_t>(t) * NUM_RANKS + r];
            from[r] = slot < 0 ? nullptr : rows + static_cast<int64_t>(send_offsets[r] + slot) * kVecs;
        }
        warp_sum_rows<kVecs, NUM_RANKS>(reinterpret_cast<int4*>(out) + static_cast<int64_t>(t) * kVecs, from, lane);
    }
}

}  // namespace ep_jit
