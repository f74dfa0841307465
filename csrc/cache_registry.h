// The registry of the ops' caches (tensor_cache.h). Torch-free, so the pybind11
// module reports and clears them without the ATen headers.
#pragma once

#include <functional>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace condensed_ops {

// Every TensorCache made so far, by name: one place counts them (tests, the
// memory a process holds) and clears them all.
class CacheRegistry {
 public:
  static CacheRegistry& instance() {
    static CacheRegistry registry;
    return registry;
  }
  void add(std::string name, std::function<size_t()> size, std::function<void()> clear) {
    std::lock_guard<std::mutex> lock(mutex_);
    members_.push_back({std::move(name), std::move(size), std::move(clear)});
  }
  std::vector<std::pair<std::string, size_t>> entries() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::pair<std::string, size_t>> all;
    for (const Member& m : members_) all.emplace_back(m.name, m.size());
    return all;
  }
  void clear_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Member& m : members_) m.clear();
  }

  // Set once by the CUDA glue: whether the current CUDA stream is capturing a
  // graph. A value computed while capturing is written only when the graph
  // replays, so no cache may keep one.
  void set_cuda_capture_check(bool (*check)()) { cuda_capturing_ = check; }
  bool cuda_capturing() const { return cuda_capturing_ != nullptr && cuda_capturing_(); }

 private:
  struct Member {
    std::string name;
    std::function<size_t()> size;
    std::function<void()> clear;
  };
  std::mutex mutex_;
  std::vector<Member> members_;
  bool (*cuda_capturing_)() = nullptr;
};

}  // namespace condensed_ops
