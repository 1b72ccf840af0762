// Count exchange over NVLink (one block).
//
// Each rank writes, into every destination's buffer, how many tokens it sends there
// and how many (token, expert) pairs go to each of that destination's experts, then
// raises its kCountsReady flag there. It then waits for every source's flag and
// publishes the receive layout: per-source offsets on the device (for the pull
// kernel) and the totals in mapped host memory, where the host reads them without
// synchronising the stream. A source whose top-k ids were out of range (found by the
// layout kernel) says so in its counts row, so every rank learns it here and can
// raise before any token moves.
#include "ep_common.cuh"

namespace ep_jit {

struct Mailbox {          // mapped pinned host memory, one per Buffer
    int done_ticket;      // written last: the fields below belong to the dispatch with this ticket
    int recv_total;
    int recv_from[64];    // tokens received from each source rank
    int tokens_per_expert[1024];
    int bad_source;       // sticky until the host clears it: 1 + first source with a bad top-k id
    int bad_index;        // 1 + flat index of that id in the source's topk_idx
};

template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__global__ void __launch_bounds__(128)
notify_kernel(const int* __restrict__ tokens_per_rank, const int* __restrict__ tokens_per_expert,
              const uint64_t* __restrict__ peers, SymLayout L, int rank, const Sequences* seqs, int ticket,
              uint64_t timeout_ns,
              Status st, int* recv_offsets, int* local_expert_counts, Mailbox* mailbox) {
    static_assert(NUM_RANKS <= 64 && NUM_EXPERTS / NUM_RANKS <= 1024, "mailbox too small");
    constexpr int kLocal = NUM_EXPERTS / NUM_RANKS;
    constexpr int kRow = 2 + kLocal;  // tokens, per local expert, bad top-k report
    __shared__ int from[NUM_RANKS];
    if (failed(st)) return;
    const uint64_t want = make_flag(TAG, seqs->dispatch + 1);
    const uint64_t my_base = peers[rank];

    // 1. send my counts to every destination, then raise its flag
    if (threadIdx.x < NUM_RANKS) {
        const int dst = threadIdx.x;
        int* row = sym_ptr<int>(peers[dst], L.counts) + rank * kRow;
        row[0] = tokens_per_rank[dst];
        for (int e = 0; e < kLocal; ++e) row[1 + e] = tokens_per_expert[dst * kLocal + e];
        row[kRow - 1] = ld_volatile(st.device + 1);
        __threadfence_system();  // counts, and the stage written by the previous kernel, before the flag
        st_release_sys(flag_slot(peers[dst], L, kCountsReady, rank, NUM_RANKS), want);
    }
    // 2. wait for every source
    if (!block_wait_all<NUM_RANKS>(my_base, L, kCountsReady, want, timeout_ns, st, kPhaseNotify)) return;
    const int* counts = sym_ptr<int>(my_base, L.counts);
    if (threadIdx.x < NUM_RANKS) from[threadIdx.x] = counts[threadIdx.x * kRow];
    __syncthreads();

    // 3. publish the receive layout
    for (int e = threadIdx.x; e < kLocal; e += blockDim.x) {
        int sum = 0;
        for (int src = 0; src < NUM_RANKS; ++src) sum += counts[src * kRow + 1 + e];
        local_expert_counts[e] = sum;
        mailbox->tokens_per_expert[e] = sum;
    }
    if (threadIdx.x == 0) {
        int run = 0;
        for (int src = 0; src < NUM_RANKS; ++src) {
            recv_offsets[src] = run;
            mailbox->recv_from[src] = from[src];
            run += from[src];
        }
        recv_offsets[NUM_RANKS] = run;
        mailbox->recv_total = run;
        for (int src = 0; src < NUM_RANKS; ++src) {
            const int bad = counts[src * kRow + kRow - 1];
            if (bad != 0 && mailbox->bad_source == 0) {
                mailbox->bad_index = bad;
                mailbox->bad_source = src + 1;
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        *reinterpret_cast<volatile int*>(&mailbox->done_ticket) = ticket;
    }
}

}  // namespace ep_jit
