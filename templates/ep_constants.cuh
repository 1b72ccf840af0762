// Constants shared by the host and the kernels. ep_jit/kernels/constants.py reads this
// file, so every value is written once: `constexpr int kName = <int>;` and enums of
// `kName = <int>` members, one per line.
#pragma once

namespace ep_jit {

constexpr int kWarpSize = 32;
constexpr int kScaleBlock = 128;        // fp8 rows carry one fp32 scale per this many elements
constexpr int kCopyThreads = 512;       // block size of every kernel that moves rows
constexpr int kLayoutThreads = 256;     // block size of the layout kernel
constexpr int kCombineChunkRows = 8;    // combine flags its pushes per this many rows at most
constexpr int kMaxRanks = 64;           // the mailbox's and the workspace's room
constexpr int kMaxLocalExperts = 1024;
constexpr int kStatusWords = 4;
constexpr int kDroppedPair = -2;        // pair_rows entry of a pair dropped for the capacity (-1: none)

// Flag words per peer in the symmetric buffer: slot [kind][p] is written by peer p.
enum FlagKind : int {
    kCountsReady = 0,     // p has staged its tokens and sent me its counts (dispatch seq)
    kStageConsumed = 1,   // p has pulled everything it needs from my stage (dispatch seq)
    kCombineConsumed = 2, // p has reduced what I pushed to it (combine seq)
    kStageReady = 3,      // p has staged its tokens for this dispatch (dispatch seq)
    kNumFlagKinds = 4,
};

// What one launch of dispatch_kernel runs (a bit set).
enum DispatchPhase : int {
    kSendPhase = 1,
    kPullPhase = 2,
};

// Where a wait timed out (status word 0 holds phase << 16 | peer + 1).
enum Phase : int {
    kPhaseStage = 1,
    kPhaseNotify = 2,
    kPhaseCombinePush = 3,
    kPhaseCombineReduce = 4,
    kPhasePull = 5,
};

}  // namespace ep_jit
