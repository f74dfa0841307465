// Results derived from tensors (validated indices, W's column layout, the
// window layout), kept while the memory they come from is alive and unchanged.
//
// An entry is keyed by where its sources' data lives: storage, offset, dtype,
// sizes and strides, so a fresh view of the same memory (a module that makes
// its int16 view of a byte buffer on every call) finds it. It holds weak
// references to the storages (no other tensor can take their memory while it
// lives) and the sources' version counters, which views share with their
// base: an in-place change through any of them, a new storage or resize, or
// the storage's death makes it miss. Inference tensors have no version counter
// and are never cached.
//
// Writes that bypass the version counter (`.data`, numpy, DLPack, a custom
// kernel) are caught only in part: each CPU source also keeps a fingerprint of
// 16 elements spread over it, which a rewrite of the whole tensor (a weight
// update, a load through `.data`) changes with near certainty, but a write of
// a few entries may miss. So whoever uses a cached result stays memory safe
// without it (the kernels check every index they read), and the Python side
// bumps the counter where torch does not (ops.mark_modified, and after every
// torch.optim step: fused optimizers write through raw pointers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Storage.h>
#include <c10/util/intrusive_ptr.h>

#include "cache_registry.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace condensed_ops {

// Sources after the first may be undefined (an absent optional argument).
template <typename Value, size_t kSources = 1, typename Key = int64_t>
class TensorCache {
 public:
  using Sources = std::array<const at::Tensor*, kSources>;

  // `name` is what CacheRegistry reports it as. Make each cache a function-local
  // static: the registry keeps a pointer to it for the life of the process.
  explicit TensorCache(std::string name) {
    CacheRegistry::instance().add(std::move(name), [this] { return size(); }, [this] { clear(); });
  }

  // The value stored for these sources under `key` (e.g. in_features), if
  // they are all unchanged since.
  std::optional<Value> find(const Sources& sources, const Key& key) {
    if (!cacheable(sources)) return std::nullopt;
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(where(*sources[0]));
    if (it == entries_.end() || it->second.key != key) return std::nullopt;
    for (size_t i = 0; i < kSources; ++i) {
      if (!it->second.sources[i].matches(*sources[i])) return std::nullopt;
    }
    it->second.last_used = ++clock_;
    return it->second.value;
  }

  // Not while the current CUDA stream captures a graph (cache_registry.h).
  void insert(const Sources& sources, const Key& key, Value value) {
    if (!cacheable(sources)) return;
    if (sources[0]->is_cuda() && CacheRegistry::instance().cuda_capturing()) return;
    Entry entry{{}, key, std::move(value), 0};
    for (size_t i = 0; i < kSources; ++i) entry.sources[i] = Source::of(*sources[i]);
    std::lock_guard<std::mutex> lock(mutex_);
    // Drop entries whose memory died: their values (layouts) may be large. A
    // sweep of every entry is cheap next to what an insert follows (a scan of
    // idx, a layout build), which happens once per tensor version.
    for (auto it = entries_.begin(); it != entries_.end();) it = it->second.expired() ? entries_.erase(it) : std::next(it);
    if (entries_.size() >= kMaxEntries) {
      entries_.erase(std::min_element(entries_.begin(), entries_.end(), [](const auto& a, const auto& b) {
        return a.second.last_used < b.second.last_used;
      }));
    }
    entry.last_used = ++clock_;
    entries_.insert_or_assign(where(*sources[0]), std::move(entry));
  }

  void forget(const at::Tensor& first_source) {
    if (!first_source.has_storage()) return;
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.erase(where(first_source));
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
  }

  size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return entries_.size();
  }

 private:
  static constexpr size_t kMaxEntries = 4096;
  using Where = std::pair<const c10::StorageImpl*, int64_t>;

  static Where where(const at::Tensor& t) { return {t.storage().unsafeGetStorageImpl(), t.storage_offset()}; }

  static bool cacheable(const Sources& sources) {
    for (const at::Tensor* t : sources) {
      // (symbolic sizes: a tensor traced by torch.compile, which has no address to key on)
      if (t->defined() && (t->is_inference() || !t->has_storage() ||
                           t->unsafeGetTensorImpl()->has_symbolic_sizes_strides())) {
        return false;
      }
    }
    return sources[0]->defined();
  }

  struct Source {
    bool defined = false;
    c10::weak_intrusive_ptr<c10::StorageImpl> storage{c10::intrusive_ptr<c10::StorageImpl>()};
    int64_t offset = 0;
    at::ScalarType dtype = at::ScalarType::Undefined;
    std::vector<int64_t> sizes, strides;
    int64_t version = -1;
    const void* data = nullptr;
    uint64_t fingerprint = 0;

    static Source of(const at::Tensor& t) {
      if (!t.defined()) return Source{};
      return Source{true,           t.storage().getWeakStorageImpl(), t.storage_offset(), t.scalar_type(),
                    t.sizes().vec(), t.strides().vec(),               int64_t(t._version()), t.const_data_ptr(),
                    fingerprint_of(t)};
    }
    bool expired() const { return defined && storage.expired(); }
    bool matches(const at::Tensor& t) const {
      if (!defined || !t.defined()) return defined == t.defined();
      return !storage.expired() && storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() &&
             offset == t.storage_offset() && dtype == t.scalar_type() && t.sizes() == sizes && t.strides() == strides &&
             version == int64_t(t._version()) && data == t.const_data_ptr() && fingerprint == fingerprint_of(t);
    }
  };

  // A hash of 16 elements at evenly spaced flat positions (first and last
  // included), read through the tensor's strides: about 50 ns. 0 off the CPU,
  // where host code cannot read the memory.
  static uint64_t fingerprint_of(const at::Tensor& t) {
    const int64_t n = t.numel();
    if (n == 0 || !t.device().is_cpu()) return 0;
    const auto* base = static_cast<const unsigned char*>(t.const_data_ptr());
    const int64_t element_bytes = int64_t(t.element_size());
    const int64_t dims = t.dim();
    uint64_t hash = 0xcbf29ce484222325ull;
    constexpr int64_t kSamples = 16;
    for (int64_t s = 0; s < kSamples; ++s) {
      int64_t flat = n == 1 ? 0 : s * (n - 1) / (kSamples - 1);
      int64_t offset = 0;
      for (int64_t d = dims - 1; d >= 0; --d) {
        const int64_t size = t.size(d);
        offset += flat % size * t.stride(d);
        flat /= size;
      }
      uint64_t word = 0;
      std::memcpy(&word, base + offset * element_bytes, size_t(std::min<int64_t>(element_bytes, 8)));
      hash = (hash ^ word) * 0x100000001b3ull;
    }
    return hash;
  }

  struct Entry {
    std::array<Source, kSources> sources;
    Key key;
    Value value;
    uint64_t last_used;  // clock_ at the last insert or hit: the least recent goes first when full
    bool expired() const {
      for (const Source& s : sources) {
        if (s.expired()) return true;
      }
      return false;
    }
  };

  std::mutex mutex_;
  std::map<Where, Entry> entries_;
  uint64_t clock_ = 0;
};

}  // namespace condensed_ops
