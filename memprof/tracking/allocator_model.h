// The caching allocator's model (see allocator_model.cpp), shared by the replay's walk
// (walk.cpp), which feeds it transient allocations without a call back into Python.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

namespace memprof {

namespace py = pybind11;

constexpr int64_t kMiB = 1024 * 1024;
constexpr int64_t kMinBlock = 512;
constexpr int64_t kSmallSize = 1 * kMiB;
constexpr int64_t kSmallBuffer = 2 * kMiB;
constexpr int64_t kMinLargeAlloc = 10 * kMiB;
constexpr int64_t kRoundLarge = 2 * kMiB;
constexpr int64_t kLargeBuffer = 20 * kMiB;
constexpr int kRoundupIntervals = 16;
constexpr int kRoundupStartLog2 = 20;
constexpr uint64_t kUnbounded = uint64_t(1) << 62;
constexpr int64_t kTemporaryKey = INT64_MIN;

inline int bit_length(uint64_t value) {
  return value == 0 ? 0 : 64 - __builtin_clzll(value);
}

// roundup_power2_next_division, as memprof.allocator._next_division.
inline int64_t next_division(int64_t size, int64_t divisions) {
  if ((size & (size - 1)) == 0) {
    return size;
  }
  const int64_t floor = int64_t(1) << (bit_length(size) - 1);
  const int64_t step = floor >> (bit_length(divisions) - 1);
  if (step == 0) {
    return floor << 1;
  }
  const int64_t rounded = size & ~(step - 1);
  return rounded == size ? size : rounded + step;
}

// Python's -(-a // b) * b: a rounded up to a multiple of b (b > 0), for any sign of a.
inline int64_t round_up(int64_t a, int64_t b) {
  int64_t quotient = a / b;
  if (a % b != 0 && a > 0) {
    quotient += 1;  // C++ truncates towards zero: only a positive remainder rounds up
  }
  return quotient * b;
}

struct Segment {
  int64_t addr;
  int64_t size;  // bytes mapped (reserved)
};

struct Block {
  int64_t addr;
  int64_t size;
  bool small;
  Segment* segment;
  Block* prev = nullptr;
  Block* next = nullptr;
  bool allocated = false;
};

// Free blocks in (size, address) order, as the native BlockPool.blocks set.
using Pool = std::map<std::pair<int64_t, int64_t>, Block*>;

class Model {
 public:
  Model(bool expandable, int64_t max_split, int64_t non_split_rounding,
        std::vector<int64_t> divisions)
      : expandable_(expandable),
        max_split_(max_split),
        non_split_rounding_(non_split_rounding),
        divisions_(std::move(divisions)) {
    for (int64_t d : divisions_) {
      any_divisions_ = any_divisions_ || d > 1;
    }
    if (divisions_.size() != kRoundupIntervals) {
      throw std::invalid_argument("roundup_power2_divisions needs 16 intervals");
    }
  }

  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  ~Model() {
    // Every block is in a pool, live, or both (a key malloc'ed twice leaves its first block
    // allocated and unreachable from the pools); collect each once.
    std::vector<Block*> all;
    for (auto& pool : pools_) {
      for (auto& item : pool) {
        all.push_back(item.second);
      }
    }
    for (auto& item : live_) {
      all.push_back(item.second);
    }
    for (Block* block : leaked_) {
      all.push_back(block);
    }
    std::sort(all.begin(), all.end());
    all.erase(std::unique(all.begin(), all.end()), all.end());
    for (Block* block : all) {
      delete block;
    }
  }

  void set_shadow(std::shared_ptr<Model> shadow) {
    shadow_ = std::move(shadow);
  }

  void malloc(int64_t key, int64_t nbytes) {
    malloc_here(key, nbytes);
    if (shadow_) {
      shadow_->malloc_here(key, nbytes);
    }
  }

  void free(int64_t key) {
    if (free_here(key) && shadow_) {
      shadow_->free_here(key);
    }
  }

  void malloc_free(int64_t nbytes) {
    malloc_free_here(nbytes);
    if (shadow_) {
      shadow_->malloc_free_here(nbytes);
    }
  }

  bool contains(int64_t key) const {
    return live_.count(key) != 0;
  }

  std::vector<int64_t> segment_sizes() const {
    std::vector<int64_t> sizes;
    for (const auto& segment : segments_) {
      if (segment->size) {
        sizes.push_back(segment->size);
      }
    }
    std::sort(sizes.begin(), sizes.end(), std::greater<int64_t>());
    return sizes;
  }

  py::dict figures() const {
    py::dict out;
    out["reserved_peak"] = reserved_peak;
    out["allocated_peak"] = allocated_peak;
    out["allocated_at_reserved_peak"] = allocated_at_reserved_peak;
    out["segments"] = segment_sizes();
    out["largest_free_at_peak"] = largest_free_at_peak;
    out["reserved"] = reserved;
    out["allocated"] = allocated;
    out["events"] = events;
    out["segment_allocs"] = segment_allocs;
    return out;
  }

  int64_t reserved = 0;
  int64_t allocated = 0;
  int64_t reserved_peak = 0;
  int64_t allocated_peak = 0;
  int64_t allocated_at_reserved_peak = 0;
  int64_t largest_free_at_peak = 0;
  int64_t events = 0;
  int64_t segment_allocs = 0;

 private:
  int64_t round(int64_t nbytes) const {
    if (nbytes < kMinBlock) {
      return kMinBlock;
    }
    int64_t size = (nbytes + kMinBlock - 1) / kMinBlock * kMinBlock;
    if (any_divisions_) {
      const int index = std::min(std::max(bit_length(nbytes) - 1 - kRoundupStartLog2, 0),
                                 kRoundupIntervals - 1);
      const int64_t divisions = divisions_[index];
      if (divisions > 1 && nbytes > kMinBlock * divisions) {
        size = next_division(nbytes, divisions);
      }
    }
    return size;
  }

  // get_free_block: the pool entry serving ``size``, or end().
  Pool::iterator best_fit(Pool& pool, bool large, int64_t size) {
    auto it = pool.lower_bound({size, 0});
    if (it == pool.end()) {
      return it;
    }
    if (it->second == tails_[large]) {
      auto after = std::next(it);
      if (after != pool.end()) {
        it = after;  // the growing end of an expandable segment: any other block first
      }
    }
    const int64_t block_size = it->second->size;
    if ((size < max_split_ && max_split_ <= block_size) ||
        (size >= max_split_ && block_size >= size + non_split_rounding_)) {
      return pool.end();
    }
    return it;
  }

  void malloc_here(int64_t key, int64_t nbytes) {
    events += 1;
    const int64_t size = round(nbytes);
    const bool large = size > kSmallSize;
    Pool& pool = pools_[large];
    Block* block = nullptr;
    auto it = best_fit(pool, large, size);
    if (it != pool.end()) {
      block = it->second;
      pool.erase(it);
    } else {
      block = alloc_block(pool, large, size);
    }
    if (block->size - size >= kMinBlock) {
      block = split(pool, large, block, size);
    }
    block->allocated = true;
    auto found = live_.find(key);
    if (found != live_.end()) {
      leaked_.push_back(found->second);  // its block stays allocated, as in the Python model
      found->second = block;
    } else {
      live_.emplace(key, block);
    }
    allocated += block->size;
    if (allocated > allocated_peak) {
      allocated_peak = allocated;
    }
    if (peak_pending_) {
      peak_pending_ = false;
      allocated_at_reserved_peak = allocated;
      largest_free_at_peak = std::max(largest(pools_[0]), largest(pools_[1]));
    }
  }

  void malloc_free_here(int64_t nbytes) {
    const int64_t size = round(nbytes);
    const bool large = size > kSmallSize;
    Pool& pool = pools_[large];
    auto it = best_fit(pool, large, size);
    if (it != pool.end()) {
      events += 2;
      const int64_t block_size = it->second->size;
      const int64_t charged = splits(large, block_size, size) ? size : block_size;
      if (allocated + charged > allocated_peak) {
        allocated_peak = allocated + charged;
      }
      return;
    }
    malloc_here(kTemporaryKey, nbytes);
    free_here(kTemporaryKey);
  }

  bool free_here(int64_t key) {
    auto found = live_.find(key);
    if (found == live_.end()) {
      return false;
    }
    Block* block = found->second;
    live_.erase(found);
    events += 1;
    allocated -= block->size;
    block->allocated = false;
    Pool& pool = pools_[!block->small];
    Block* prev = block->prev;
    Block* next = block->next;
    if (prev != nullptr && !prev->allocated) {
      merge(pool, block, prev);
    }
    if (next != nullptr && !next->allocated) {
      merge(pool, block, next);
    }
    pool.emplace(std::make_pair(block->size, block->addr), block);
    return true;
  }

  static int64_t largest(const Pool& pool) {
    return pool.empty() ? 0 : pool.rbegin()->first.first;
  }

  Block* alloc_block(Pool& pool, bool large, int64_t size) {
    if (expandable_) {
      return expand(pool, large, size);
    }
    int64_t segment_size;
    if (size <= kSmallSize) {
      segment_size = kSmallBuffer;
    } else if (size < kMinLargeAlloc) {
      segment_size = kLargeBuffer;
    } else {
      segment_size = (size + kRoundLarge - 1) / kRoundLarge * kRoundLarge;
    }
    const int64_t addr = static_cast<int64_t>(next_addr_);
    next_addr_ += static_cast<uint64_t>(segment_size + kRoundLarge);
    segments_.push_back(std::make_unique<Segment>(Segment{addr, segment_size}));
    grow(segment_size);
    return new Block{addr, segment_size, !large, segments_.back().get()};
  }

  Block* expand(Pool& pool, bool large, int64_t size) {
    const int64_t page = large ? kLargeBuffer : kSmallBuffer;
    Segment*& segment = expandable_segments_[large];
    Block*& tail = tails_[large];
    if (segment == nullptr) {
      const int64_t addr = static_cast<int64_t>(next_addr_);
      next_addr_ += kUnbounded;
      segments_.push_back(std::make_unique<Segment>(Segment{addr, 0}));
      segment = segments_.back().get();
    }
    int64_t have = 0;
    if (tail != nullptr && !tail->allocated) {
      have = tail->size;
    }
    // Negative when the tail is larger than the request but refused it (an oversize block):
    // the Python model then shrinks the segment, and so does this one.
    const int64_t need = round_up(size - have, page);
    segment->size += need;
    grow(need);
    if (tail != nullptr && !tail->allocated) {
      pool.erase({tail->size, tail->addr});
      tail->size += need;
      return tail;
    }
    Block* block = new Block{segment->addr + segment->size - need, need, !large, segment};
    block->prev = tail;
    if (tail != nullptr) {
      tail->next = block;
    }
    tail = block;
    return block;
  }

  void grow(int64_t nbytes) {
    segment_allocs += 1;
    reserved += nbytes;
    if (reserved > reserved_peak) {
      reserved_peak = reserved;
      peak_pending_ = true;
    }
  }

  bool splits(bool large, int64_t block_size, int64_t size) const {
    const int64_t remaining = block_size - size;
    if (!large || expandable_) {
      return remaining >= kMinBlock;
    }
    return size < max_split_ && remaining > kSmallSize;
  }

  Block* split(Pool& pool, bool large, Block* block, int64_t size) {
    if (!splits(large, block->size, size)) {
      return block;
    }
    const int64_t remaining = block->size - size;
    Block* front = new Block{block->addr, size, !large, block->segment};
    front->prev = block->prev;
    if (front->prev != nullptr) {
      front->prev->next = front;
    }
    front->next = block;
    block->prev = front;
    block->addr += size;
    block->size = remaining;
    pool.emplace(std::make_pair(block->size, block->addr), block);
    return front;
  }

  void merge(Pool& pool, Block* block, Block* other) {
    pool.erase({other->size, other->addr});
    if (other == block->prev) {
      block->addr = other->addr;
      block->prev = other->prev;
      if (block->prev != nullptr) {
        block->prev->next = block;
      }
    } else {
      block->next = other->next;
      if (block->next != nullptr) {
        block->next->prev = block;
      }
      const bool large = !block->small;
      if (tails_[large] == other) {
        tails_[large] = block;
      }
    }
    block->size += other->size;
    delete other;
  }

  const bool expandable_;
  const int64_t max_split_;
  const int64_t non_split_rounding_;
  const std::vector<int64_t> divisions_;
  bool any_divisions_ = false;
  Pool pools_[2];  // index: large
  Segment* expandable_segments_[2] = {nullptr, nullptr};
  Block* tails_[2] = {nullptr, nullptr};  // an expandable segment's last block
  std::vector<std::unique_ptr<Segment>> segments_;
  std::unordered_map<int64_t, Block*> live_;
  std::vector<Block*> leaked_;
  uint64_t next_addr_ = uint64_t(1) << 40;
  bool peak_pending_ = false;
  std::shared_ptr<Model> shadow_;
};

}  // namespace memprof
