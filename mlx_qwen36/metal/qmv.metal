// Affine-quantized matrix-vector products for a few rows of x, several weights of the same input in one launch:
// y[n] = [W0 x'; W1 x'; W2 x'; W3 x'] (rows R0, R1, R2, R3; a weight with no rows is absent), one SIMD-group per
// (row n, output row). With GATED, x' = x * sigmoid(gate) (the attention output gate); otherwise x' = x. With
// RESIDUAL, residual[n] is added (the decoder block's skip connection), rounded once as the ops path rounds it.
constexpr int WPR = H * BITS / 32;
constexpr int GPR = H / GS;
constexpr int R = R0 + R1 + R2 + R3;
uint lane = thread_index_in_simdgroup;
uint r = thread_position_in_grid.y;
uint n = thread_position_in_grid.z;
if (r >= uint(R)) {
  return;
}
auto xn = x + size_t(n) * H;
auto gn = gate + size_t(n) * (GATED ? H : 0);
// Each weight in its own call: the layers' pointers may lie in different address spaces.
float acc;
if (r < uint(R0)) {
  size_t o = r;
  acc = qdot_lane<T, BITS, GS, GATED>(xn, gn, w0 + o * WPR, s0 + o * GPR, b0 + o * GPR, H, lane);
} else if (r < uint(R0 + R1)) {
  size_t o = r - R0;
  acc = qdot_lane<T, BITS, GS, GATED>(xn, gn, w1 + o * WPR, s1 + o * GPR, b1 + o * GPR, H, lane);
} else if (r < uint(R0 + R1 + R2)) {
  size_t o = r - R0 - R1;
  acc = qdot_lane<T, BITS, GS, GATED>(xn, gn, w2 + o * WPR, s2 + o * GPR, b2 + o * GPR, H, lane);
} else {
  size_t o = r - R0 - R1 - R2;
  acc = qdot_lane<T, BITS, GS, GATED>(xn, gn, w3 + o * WPR, s3 + o * GPR, b3 + o * GPR, H, lane);
}
acc = simd_sum(acc);
if (lane == 0) {
  float out = RESIDUAL ? float(residual[size_t(n) * R + r]) + float(T(acc)) : acc;
  y[size_t(n) * R + r] = T(out);
}
