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

 private:
  struct Member {
    std::string name;
    std::function<size_t()> size;
    std::function<void()> clear;
  };
  std::mutex mutex_;
  std::vector<Member> members_;
};

}  // namespace condensed_ops
