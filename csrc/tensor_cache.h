// Results derived from tensors (validated indices, W's column layout, the
// window layout), kept while their source tensors are alive and unchanged.
//
// An entry holds weak references to its sources (so no other tensor can take
// their addresses while it lives), their version counters and data pointers:
// an in-place change, a new storage (`t.data = ...`), a resize or the death of
// a source makes it miss. Inference tensors have no version counter and are
// never cached. Writes through `.data` views or numpy bypass version counters,
// so whoever uses a cached result must stay memory safe without it (the
// kernels check every index they read).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>

#include <array>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

namespace condensed_ops {

// Sources after the first may be undefined (an absent optional argument).
template <typename Value, size_t kSources = 1, typename Key = int64_t>
class TensorCache {
 public:
  using Sources = std::array<const at::Tensor*, kSources>;

  // The value stored for these sources under `key` (e.g. in_features), if
  // they are all unchanged since.
  std::optional<Value> find(const Sources& sources, const Key& key) {
    if (!cacheable(sources)) return std::nullopt;
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(sources[0]->unsafeGetTensorImpl());
    if (it == entries_.end() || it->second.key != key) return std::nullopt;
    for (size_t i = 0; i < kSources; ++i) {
      if (!it->second.sources[i].matches(*sources[i])) return std::nullopt;
    }
    return it->second.value;
  }

  void insert(const Sources& sources, const Key& key, Value value) {
    if (!cacheable(sources)) return;
    Entry entry{{}, key, std::move(value)};
    for (size_t i = 0; i < kSources; ++i) entry.sources[i] = Source::of(*sources[i]);
    std::lock_guard<std::mutex> lock(mutex_);
    // Drop entries whose sources died: their values (layouts) may be large.
    for (auto it = entries_.begin(); it != entries_.end();) it = it->second.expired() ? entries_.erase(it) : ++it;
    if (entries_.size() >= kMaxEntries) entries_.clear();
    entries_.insert_or_assign(sources[0]->unsafeGetTensorImpl(), std::move(entry));
  }

  void forget(const at::Tensor& first_source) {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.erase(first_source.unsafeGetTensorImpl());
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

  static bool cacheable(const Sources& sources) {
    for (const at::Tensor* t : sources) {
      if (t->defined() && t->is_inference()) return false;
    }
    return sources[0]->defined();
  }

  struct Source {
    bool defined = false;
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl{c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
    int64_t version = -1;
    const void* data = nullptr;
    std::vector<int64_t> sizes, strides;  // in-place metadata changes (as_strided_) keep the version

    static Source of(const at::Tensor& t) {
      if (!t.defined()) return Source{};
      return Source{true, c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(t.getIntrusivePtr()),
                    int64_t(t._version()), t.const_data_ptr(), t.sizes().vec(), t.strides().vec()};
    }
    bool expired() const { return defined && impl.expired(); }
    bool matches(const at::Tensor& t) const {
      if (!defined || !t.defined()) return defined == t.defined();
      return !impl.expired() && impl._unsafe_get_target() == t.unsafeGetTensorImpl() &&
             version == int64_t(t._version()) && data == t.const_data_ptr() && t.sizes() == sizes &&
             t.strides() == strides;
    }
  };

  struct Entry {
    std::array<Source, kSources> sources;
    Key key;
    Value value;
    bool expired() const {
      for (const Source& s : sources) {
        if (s.expired()) return true;
      }
      return false;
    }
  };

  std::mutex mutex_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
};

}  // namespace condensed_ops
