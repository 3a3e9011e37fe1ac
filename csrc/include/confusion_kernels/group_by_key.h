// Rows grouped by an integer key (a class, a prototype), for host code: CPU
// kernels that give each key one owner, and the host label sort of
// sorted_rows.h. A stable counting sort, O(n + keys).
#pragma once

#include <cstdint>
#include <vector>

namespace confusion_kernels {

// order lists the rows key by key, each key's rows in increasing order; key q's
// rows are order[start[q]] .. order[start[q + 1] - 1]. Keys must lie in [0, keys).
struct KeyGroups {
  std::vector<int64_t> start, order;
};

inline KeyGroups group_by_key(const int64_t* key, int64_t n, int64_t keys) {
  KeyGroups g{std::vector<int64_t>(keys + 1, 0), std::vector<int64_t>(n)};
  for (int64_t i = 0; i < n; ++i) ++g.start[key[i] + 1];
  for (int64_t q = 0; q < keys; ++q) g.start[q + 1] += g.start[q];
  std::vector<int64_t> next(g.start.begin(), g.start.end() - 1);
  for (int64_t i = 0; i < n; ++i) g.order[next[key[i]]++] = i;
  return g;
}

}  // namespace confusion_kernels
