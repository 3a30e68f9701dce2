// Per-sample seeds and drawn labels exactly as fastsample's Python pipeline computes them, so that
// `fastsample-run --seed S` gives sample i the noise and label `fastsample sample --seed S` does.
//
//   sample_seed(S, i, stream) = numpy.random.SeedSequence([S, i, stream]).generate_state(1, uint64)
//   drawn label of sample i   = numpy.random.default_rng(sample_seed(S, i, 1)).integers(classes)
//
// numpy's SeedSequence (O'Neill's seed_seq hashing, pool of four 32-bit words), its PCG64
// (XSL-RR 128/64) and its bounded integers (Lemire's multiply-shift rejection on 32-bit draws)
// are reimplemented here; ctest compares them against numpy for many seeds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fastsample::seeds {

// numpy.random.SeedSequence with an entropy of non-negative integers and no spawn key.
class SeedSequence {
 public:
  explicit SeedSequence(const std::vector<uint64_t>& entropy) {
    // numpy turns each integer into 32-bit words, least significant first (at least one word).
    std::vector<uint32_t> words;
    for (uint64_t v : entropy) {
      do {
        words.push_back(static_cast<uint32_t>(v));
        v >>= 32;
      } while (v != 0);
    }
    uint32_t hash_const = kInitA;
    auto hashmix = [&](uint32_t value) {
      value ^= hash_const;
      hash_const *= kMultA;
      value *= hash_const;
      value ^= value >> kXShift;
      return value;
    };
    auto mix = [](uint32_t x, uint32_t y) {
      uint32_t result = kMixMultL * x - kMixMultR * y;
      return result ^ (result >> kXShift);
    };
    for (size_t i = 0; i < kPoolSize; ++i) pool_[i] = hashmix(i < words.size() ? words[i] : 0);
    for (size_t src = 0; src < kPoolSize; ++src)
      for (size_t dst = 0; dst < kPoolSize; ++dst)
        if (src != dst) pool_[dst] = mix(pool_[dst], hashmix(pool_[src]));
    for (size_t src = kPoolSize; src < words.size(); ++src)
      for (size_t dst = 0; dst < kPoolSize; ++dst) pool_[dst] = mix(pool_[dst], hashmix(words[src]));
  }

  // generate_state(n, np.uint64): 2n 32-bit words, paired little-endian.
  std::vector<uint64_t> generate_state_u64(size_t n) const {
    uint32_t hash_const = kInitB;
    std::vector<uint32_t> words(2 * n);
    for (size_t i = 0; i < words.size(); ++i) {
      uint32_t v = pool_[i % kPoolSize];
      v ^= hash_const;
      hash_const *= kMultB;
      v *= hash_const;
      v ^= v >> kXShift;
      words[i] = v;
    }
    std::vector<uint64_t> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = words[2 * i] | (static_cast<uint64_t>(words[2 * i + 1]) << 32);
    return out;
  }

 private:
  static constexpr size_t kPoolSize = 4;
  static constexpr uint32_t kInitA = 0x43b0d7e5, kMultA = 0x931e8875;
  static constexpr uint32_t kInitB = 0x8b51f9dd, kMultB = 0x58f38ded;
  static constexpr uint32_t kMixMultL = 0xca01f9dd, kMixMultR = 0x4973f715;
  static constexpr int kXShift = 16;
  uint32_t pool_[kPoolSize] = {};
};

// fastsample.sampling.sample_seed: the generator seed of sample `index` (stream 1: its label).
inline uint64_t sample_seed(uint64_t seed, uint64_t index, uint64_t stream = 0) {
  return SeedSequence({seed, index, stream}).generate_state_u64(1)[0];
}

// numpy's PCG64 as numpy.random.default_rng(seed) builds it: state and increment from
// SeedSequence(seed).generate_state(4, uint64), the first word of each pair the high half.
class PCG64 {
 public:
  explicit PCG64(uint64_t seed) {
    std::vector<uint64_t> v = SeedSequence({seed}).generate_state_u64(4);
    const u128 init_state = (static_cast<u128>(v[0]) << 64) | v[1];
    const u128 init_seq = (static_cast<u128>(v[2]) << 64) | v[3];
    state_ = 0;
    inc_ = (init_seq << 1) | 1;
    step();
    state_ += init_state;
    step();
  }

  uint64_t next64() {
    step();
    const uint64_t folded = static_cast<uint64_t>(state_ >> 64) ^ static_cast<uint64_t>(state_);
    const unsigned rot = static_cast<unsigned>(state_ >> 122);
    return (folded >> rot) | (folded << ((64 - rot) & 63));
  }

  // A 64-bit draw serves two 32-bit ones, low half first.
  uint32_t next32() {
    if (has_half_) {
      has_half_ = false;
      return half_;
    }
    const uint64_t v = next64();
    half_ = static_cast<uint32_t>(v >> 32);
    has_half_ = true;
    return static_cast<uint32_t>(v);
  }

  // Generator.integers(classes) for 1 <= classes <= 2^32: Lemire's method on 32-bit draws.
  uint64_t integers(uint64_t classes) {
    const uint64_t rng = classes - 1;
    if (rng == 0) return 0;
    if (rng == 0xFFFFFFFFull) return next32();
    const uint32_t excl = static_cast<uint32_t>(rng) + 1;
    uint64_t m = static_cast<uint64_t>(next32()) * excl;
    uint32_t leftover = static_cast<uint32_t>(m);
    if (leftover < excl) {
      const uint32_t threshold = (0xFFFFFFFFu - static_cast<uint32_t>(rng)) % excl;
      while (leftover < threshold) {
        m = static_cast<uint64_t>(next32()) * excl;
        leftover = static_cast<uint32_t>(m);
      }
    }
    return m >> 32;
  }

 private:
  using u128 = unsigned __int128;
  static constexpr u128 kMult =
      (static_cast<u128>(0x2360ed051fc65da4ull) << 64) | 0x4385df649fccf645ull;
  void step() { state_ = state_ * kMult + inc_; }
  u128 state_ = 0, inc_ = 0;
  uint32_t half_ = 0;
  bool has_half_ = false;
};

// The label fastsample's pipeline draws for sample `index` of a run seeded `seed`.
inline int64_t drawn_label(uint64_t seed, uint64_t index, int64_t classes) {
  return static_cast<int64_t>(PCG64(sample_seed(seed, index, 1)).integers(static_cast<uint64_t>(classes)));
}

}  // namespace fastsample::seeds
