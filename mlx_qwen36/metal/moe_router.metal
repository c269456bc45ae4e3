// Top-K of E router logits and their softmax weights, one SIMD-group per token, without sorting: K rounds of a
// SIMD max (ties to the lower expert id), then an fp32 softmax over the K picked logits (equal to renormalising the
// full softmax's top K). With HAS_SHARED, weights[:, K] is sigmoid(shared_logit), the shared expert's gate.
constexpr int PER = (E + 31) / 32;
constexpr int W = K + (HAS_SHARED ? 1 : 0);
uint lane = thread_index_in_simdgroup;
uint n = thread_position_in_grid.y;

float vals[PER];
const device T* row = logits + size_t(n) * E;
for (int i = 0; i < PER; i++) {
  int e = int(lane) + 32 * i;
  vals[i] = e < E ? float(row[e]) : -INFINITY;
}
uint taken = 0;
float top_v[K];
uint top_i[K];
for (int r = 0; r < K; r++) {
  float best = -INFINITY;
  uint best_i = 0xFFFFFFFFu;
  for (int i = 0; i < PER; i++) {
    int e = int(lane) + 32 * i;
    if (e < E && !(taken & (1u << i)) && (best_i == 0xFFFFFFFFu || vals[i] > best)) {
      best = vals[i];
      best_i = uint(e);
    }
  }
  float m = simd_max(best_i == 0xFFFFFFFFu ? -INFINITY : best);
  uint pick = simd_min((best_i != 0xFFFFFFFFu && best == m) ? best_i : 0xFFFFFFFFu);
  if (pick == best_i) {
    taken |= 1u << ((pick - lane) / 32);
  }
  top_v[r] = m;
  top_i[r] = pick;
}
if (lane == 0) {
  float total = 0.0f;
  float e_v[K];
  for (int r = 0; r < K; r++) {
    e_v[r] = metal::exp(top_v[r] - top_v[0]);
    total += e_v[r];
  }
  for (int r = 0; r < K; r++) {
    inds[size_t(n) * K + r] = top_i[r];
    weights[size_t(n) * W + r] = T(e_v[r] / total);
  }
  if (HAS_SHARED) {
    weights[size_t(n) * W + K] = T(sigmoid_f(float(shared_logit[n])));
  }
}
