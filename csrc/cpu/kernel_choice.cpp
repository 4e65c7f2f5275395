// Kernel choice by measurement (see kernel_choice.h): the timing, the verdict cache
// and the op that reports them.
#include "cpu/kernel_choice.h"

#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

namespace attnext {
namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, KernelChoice> verdicts;
  std::vector<std::string> order;
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: kernels may run during shutdown
  return *r;
}

double seconds(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string fmt_time(double s) {
  char buf[32];
  if (s >= 1e-3) {
    std::snprintf(buf, sizeof buf, "%.2f ms", s * 1e3);
  } else {
    std::snprintf(buf, sizeof buf, "%.1f us", s * 1e6);
  }
  return buf;
}

}  // namespace

int kernel_override(const char* env) {
  const char* v = std::getenv(env);
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return -1;
  return std::strcmp(v, "0") == 0 ? 0 : 1;
}

const KernelChoice* find_kernel(const std::string& what) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.verdicts.find(what);
  return it == r.verdicts.end() ? nullptr : &it->second;  // std::map nodes never move
}

const KernelChoice& fixed_kernel(const std::string& what, bool own, const std::string& why) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.verdicts.find(what);
  if (it == r.verdicts.end()) {
    it = r.verdicts.emplace(what, KernelChoice{own, why}).first;
    r.order.push_back(what);
  }
  return it->second;
}

const KernelChoice& choose_kernel(const std::string& what, const std::string& own_name, const std::string& lib_name,
                                  const std::function<void()>& own, const std::function<void()>& lib, int forced) {
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.verdicts.find(what);
    if (it != r.verdicts.end()) return it->second;
  }
  if (forced >= 0) {
    return fixed_kernel(what, forced == 1, (forced == 1 ? own_name : lib_name) + " (forced by the environment)");
  }
  // Measured outside the lock (the workloads may take the lock themselves); two
  // threads racing here both measure, and the first verdict stored wins.
  own();
  lib();
  double t_own = 1e30, t_lib = 1e30;
  for (int round = 0; round < 3; ++round) {
    t_own = std::min(t_own, seconds(own));
    t_lib = std::min(t_lib, seconds(lib));
  }
  const bool pick_own = t_own <= t_lib;
  return fixed_kernel(what, pick_own,
                      (pick_own ? own_name : lib_name) + " (measured on this CPU: " + own_name + " " + fmt_time(t_own) +
                          ", " + lib_name + " " + fmt_time(t_lib) + ")");
}

std::vector<std::string> kernel_choices() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::vector<std::string> out;
  for (const std::string& what : r.order) out.push_back(what + ": " + r.verdicts.at(what).why);
  return out;
}

}  // namespace attnext
