// Prints what a CUTLASS plan's kernel would do, from the rendered plan header alone (host code):
//   T <q tile> <kv tile> <0 full | 1 masked> <first kv row>   per tile loaded, in the kernel's order
//   C <q tile> <unmasked> <masked>             the consumers' trip counts
//   E <q tile>                                 a Q tile whose box is empty
//   K <q row> <bits>                           keep(q row, k row) for every permuted k row
// tests/test_cutlass.py compiles it with the system C++ compiler and checks it against the
// brute-force mask.
#include <cstdio>
#include <string>

#include "plan.cuh"

int main() {
  using namespace attncc_plan;
  for (int m = 0; m < GROUPS * Q_TILES; ++m) {
    Walk walk(m);
    if (walk.empty()) std::printf("E %d\n", m);
    std::printf("C %d %d %d\n", m, walk.full, walk.loads() - walk.full);  // as the kernel's compute()
    Cursor cursor(walk);
    for (int n = 0; n < walk.loads(); ++n, ++cursor) {  // as the kernel's producer warp
      std::printf("T %d %d %d %d\n", m, *cursor, cursor.masked ? 1 : 0, cursor.kv_row());
    }
  }
  std::string bits(ROWS_K, '0');
  for (int q = 0; q < ROWS_Q; ++q) {
    for (int k = 0; k < ROWS_K; ++k) bits[k] = keep(q, k) ? '1' : '0';
    std::printf("K %d %s\n", q, bits.c_str());
  }
  std::printf("R %d %d\n", ROWS_Q, ROWS_K);
  return 0;
}
