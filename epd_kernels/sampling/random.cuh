// Counter-based uniform draws, bit-identical to epd_kernels/reference.py:random_uniform.
#pragma once
#include <cstdint>

namespace epd {

// murmur3's 32-bit finaliser.
__device__ __forceinline__ uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// Uniform in [0, 1) with 24 random bits, from (seed, step) alone: independent of the batch.
__device__ __forceinline__ float random_uniform(int64_t seed, int64_t step) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t seed32 = static_cast<uint32_t>(s) ^ fmix32(static_cast<uint32_t>(s >> 32));
  const uint32_t counter = static_cast<uint32_t>(static_cast<uint64_t>(step) + 0x9E3779B9ull);
  const uint32_t x = fmix32(seed32 ^ fmix32(counter));
  return static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
}

}  // namespace epd
