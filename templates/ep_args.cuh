// Every struct the host and the kernels share, and one argument struct per kernel,
// passed by value as the kernel's only parameter. ep_jit/kernels/args.py mirrors each
// field by name; tests/test_mirrors.py compiles a check of every size and offset.
#pragma once

#include <cuda/std/cstdint>

#include "ep_constants.cuh"

namespace ep_jit {

using cuda::std::int32_t;
using cuda::std::int64_t;
using cuda::std::uint32_t;
using cuda::std::uint64_t;

// Status words. Kernels read the device copy (cheap); the first writer of a word also
// stores it into the host copy (mapped pinned memory), which the host polls.
//   [0] error: 0, or phase << 16 | (peer + 1) when a wait timed out
//   [1] 1 + flat index of a top-k id outside [-1, E) (the first one reported), else 0
//   [2] received rows when they exceeded the non-blocking capacity, else 0
//   [3] rows of this rank's tokens that a peer dropped for its capacity (found by combine)
struct Status {
    int* device;
    int* host;
};

// Byte offsets of the regions of every rank's symmetric buffer (the same on every rank;
// ep_jit/symmetric.py computes them), and the Buffer's identity.
struct SymLayout {
    int64_t flags;           // uint64 [kNumFlagKinds][R]: slot [kind][p] is written by peer p
    int64_t counts;          // int [R][2 + E/R]: from source p: tokens for me, per local expert, bad id
    int64_t send_index;      // int [R][max_tokens]: for destination r, slot -> my token index
    int64_t stage_x;         // T [max_tokens][H]: my tokens, staged for peers to pull
    int64_t stage_scales;    // float [max_tokens][H/128] (fp8 only)
    int64_t stage_idx;       // int64 [max_tokens][K]
    int64_t stage_weights;   // float [max_tokens][K]
    int64_t stage_pos;       // int [max_tokens][K]: rank of pair (t, k) among my pairs of its expert (expert layout)
    int64_t combine;         // bf16 [R][max_tokens][H]: rows expert rank p pushed back for my tokens
    int64_t combine_ready;   // uint64 [R][max_tokens]: [p][k] says chunk k of p's pushes to me is in
                             // place (combine seq); combine.cu sizes the chunks
    int64_t combine_scalars; // float [R][max_tokens][K]: per-pair values p pushed back with its rows
    int64_t combine_dropped; // int [R]: [p] = rows of my tokens that p dropped for its capacity, this combine
    int32_t max_tokens;
    uint32_t nonce;          // this Buffer's, agreed by every member at set-up; part of every flag
};

// Sequence numbers live on the device, so a captured CUDA graph replays with fresh
// ones: an operation uses last + 1 and its final kernel stores it back when done.
// Dispatches and combines count separately (their flags are separate kinds). At set-up
// every rank posts "consumed" for sequence 0 into its own slots, so the first round
// waits like every other.
struct Sequences {
    uint32_t dispatch;  // last completed dispatch
    uint32_t combine;   // last completed combine
};

// The NVLink transport's device workspace, one per Buffer, zeroed at set-up.
struct Workspace {
    uint64_t counts_ready;   // send: the last dispatch whose receive layout is published (a flag word)
    int32_t layout_done;     // send: layout blocks finished (the last exchanges the counts)
    int32_t stage_done;      // send: staging blocks finished (the last posts kStageReady)
    int32_t pull_done;       // pull: blocks finished (the last posts kStageConsumed)
    int32_t combine_done;    // combine: blocks finished (the last posts kCombineConsumed)
    int32_t combine_queue;   // combine: the next token a reducing warp takes
    int32_t status[kStatusWords];
    Sequences seqs;
    int32_t tokens_per_rank[kMaxRanks];
    int32_t tokens_per_expert[kMaxRanks * kMaxLocalExperts];  // global expert ids
};

// Mapped pinned host memory the kernels write and the host reads, one per Buffer.
struct Mailbox {
    uint32_t done_ticket;    // written last: the fields below belong to the dispatch with this ticket
    uint32_t started_ticket; // written by the send kernel's last block as it starts (the host's deadline counts from then)
    int32_t recv_total;
    int32_t recv_from[kMaxRanks];                // tokens received from each source rank
    int32_t tokens_per_expert[kMaxLocalExperts];
    int32_t bad_source;      // sticky until the host clears it: 1 + first source with a bad top-k id
    int32_t bad_index;       // 1 + flat index of that id in the source's topk_idx
    int32_t status[kStatusWords];  // the host copy of the status words
};

// What every NVLink kernel of a Buffer shares; set once when the Buffer is made.
struct Peers {
    const uint64_t* bases;   // [R] device address of every rank's symmetric buffer
    SymLayout layout;
    Workspace* ws;
    Mailbox* mailbox;        // device address of the mapped mailbox
    uint64_t timeout_ns;
    int32_t rank;
};

// ---- one struct per kernel ----------------------------------------------------------
// Pointers to dtype-dependent rows are void*; the kernels cast them to their T.

struct LayoutArgs {          // layout_kernel (collective transport)
    const int64_t* topk_idx;     // [T, K]
    bool* is_token_in_rank;      // [T, R]
    int32_t* token_slot;         // [T, R]
    int32_t* tokens_per_rank;    // [R]
    int32_t* tokens_per_expert;  // [E]
    Status status;
    int32_t num_tokens;
};

struct SendArgs {            // dispatch_kernel's send phase (on the source)
    Peers peers;
    const void* x;               // T [T, H]
    const float* scales;         // [T, H/128], fp8 only
    const int64_t* topk_idx;     // [T, K]
    const float* topk_weights;   // [T, K]
    bool* is_token_in_rank;      // [T, R]
    int32_t* token_slot;         // [T, R]
    int32_t* recv_offsets;       // [R + 1]
    int32_t* local_expert_counts;  // [E/R]
    int32_t* expert_offsets;     // [E/R + 1]: padded segment starts (expert layout, else null)
    int32_t* expert_base;        // [R][E/R]: first row of source p's pairs in segment e (expert layout)
    int32_t* sent_counts;        // [R]: tokens sent to each destination
    int32_t num_tokens;
    int32_t pad_multiple;        // expert layout: segments start at multiples of it; 0: token layout
    int32_t restage;             // 1: only stage x as bf16 rows (a gradient moved along an earlier layout)
    uint32_t ticket;             // default mode: echoed in the mailbox once the counts are in; 0: none
};

struct PullArgs {            // dispatch_kernel's pull phase (on the destination)
    Peers peers;
    void* recv_x;                // T [capacity, H]
    float* recv_scales;          // [capacity, H/128], fp8 only
    int64_t* recv_idx;           // [capacity, K]
    float* recv_weights;         // [capacity, K]
    const int32_t* recv_offsets; // [R + 1]
    int32_t* recv_token;         // [token_rows]: source token of each received token row (read when restaging)
    int32_t* pair_rows;          // [token_rows, K]: row of each pair in the expert layout, -1: none,
                                 // kDroppedPair: past the capacity; null: token layout
    const int32_t* expert_base;  // [R][E/R], expert layout
    const int32_t* expert_offsets;  // [E/R + 1], expert layout
    const int32_t* expert_counts;   // [E/R], expert layout
    int32_t capacity;            // rows of recv_x; < 0 abandons the dispatch
    int32_t token_rows;          // rows of recv_token and pair_rows
    int32_t restage;             // 1: move the bf16 rows the sources restaged, along the saved layout
};

struct DispatchArgs {        // dispatch_kernel (NVLink)
    SendArgs send;
    PullArgs pull;
    int32_t phases;              // kSendPhase, kPullPhase or both
};

struct CombineArgs {         // combine_kernel (NVLink)
    Peers peers;
    const void* y;               // bf16 [num_rows, H]
    const int32_t* recv_offsets; // [R + 1], from dispatch
    void* out;                   // bf16 [num_tokens, H]
    const int32_t* token_slot;   // [num_tokens, R], from dispatch
    const int32_t* sent_counts;  // [R], from dispatch
    const int32_t* pair_rows;    // [num_rows, K]: expert layout (y rows of each token row's pairs, < 0: none),
                                 // else null
    const float* pair_weights;   // [rows of y]: expert layout weights; null: 1
    const float* scalars;        // per-pair values to bring back: [rows of y] (expert) or [num_rows, K] (token)
    const int64_t* recv_idx;     // [num_rows, K], token layout with scalars: which entries are this rank's
    float* scalars_out;          // [num_tokens, K]: sum over ranks of the pairs' scalars; null: none
    int32_t num_rows;
    int32_t num_tokens;
    int32_t with_rows;           // 0: the scalars alone move (y and out unused), the same on every member
};

struct CountArgs {           // count_kernel (collective transport)
    const int32_t* gathered;     // [R][R + E + kStatusWords]: every member's counts row
    int32_t* send_offsets;       // [R + 1]
    int32_t* recv_offsets;       // [R + 1]
    int32_t* local_expert_counts;  // [E/R]
    uint32_t* host;              // mapped: [0] the ticket, written last; from [4] the gathered rows
    int32_t rank;
    uint32_t ticket;
};

struct PackArgs {            // pack_kernel (collective transport)
    const void* x;               // T [T, H]
    const float* scales;         // [T, H/128], fp8 only
    const int64_t* topk_idx;     // [T, K]
    const float* topk_weights;   // [T, K]
    const int32_t* token_slot;   // [T, R]
    const int32_t* send_offsets; // [R + 1]
    void* send_x;                // T [sent rows, H]
    char* send_meta;             // [sent rows, MetaRow::kBytes]
    int32_t num_tokens;
};

struct UnpackArgs {          // unpack_kernel (collective transport)
    const char* recv_meta;       // [num_rows, MetaRow::kBytes]
    float* recv_scales;          // [num_rows, H/128], fp8 only
    int64_t* recv_idx;           // [num_rows, K]
    float* recv_weights;         // [num_rows, K]
    int32_t num_rows;
};

struct SumArgs {             // sum_kernel (collective transport)
    const void* returned;        // bf16 [sent rows, H]: what each destination sent back
    const int32_t* token_slot;   // [T, R]
    const int32_t* send_offsets; // [R + 1]
    void* out;                   // bf16 [T, H]
    int32_t num_tokens;
};

}  // namespace ep_jit
