// Down projections of every slot and their weighted sum, for a few tokens: one SIMD-group per (token, output row).
// y[n, h] = sum over slots s of weights[n, s] * down_s[h] . act[n, s]; slots 0..K-1 read the routed experts'
// down weights [E, H, I], slot K (HAS_SHARED) the shared expert's [H, IS] with weights[n, K] its sigmoid gate.
// With RESIDUAL, residual[n, h] (the block's skip connection) is added.
constexpr int SLOTS = K + (HAS_SHARED ? 1 : 0);
constexpr int IMAX = I > IS ? I : IS;
uint lane = thread_index_in_simdgroup;
uint h = thread_position_in_grid.y;
uint n = thread_position_in_grid.z;

float acc = 0.0f;
for (int s = 0; s < SLOTS; s++) {
  auto a_s = act + (size_t(n) * SLOTS + s) * IMAX;
  float wt = float(weights[size_t(n) * SLOTS + s]);
  if (s < K) {
    size_t row = size_t(inds[n * K + s]) * H + h;
    acc += wt * qdot_lane<T, BITS, GS, false>(a_s, a_s, w + row * (I * BITS / 32), scales + row * (I / GS),
                                             biases + row * (I / GS), I, lane);
  } else {
    acc += wt * qdot_lane<T, BITS, GS, false>(a_s, a_s, shared_w + size_t(h) * (IS * BITS / 32),
                                             shared_scales + size_t(h) * (IS / GS),
                                             shared_biases + size_t(h) * (IS / GS), IS, lane);
  }
}
acc = simd_sum(acc);
if (lane == 0) {
  y[size_t(n) * H + h] = RESIDUAL ? T(float(residual[size_t(n) * H + h]) + float(T(acc))) : T(acc);
}
