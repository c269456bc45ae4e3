// Routed (and shared) expert gate and up projections with SwiGLU, for a few tokens: one SIMD-group per
// (token, slot, row). Slots 0..K-1 are the token's routed experts (gate_up weight [E, 2I, H], gate rows first);
// slot K, with HAS_SHARED, is the shared expert (its own gate and up weights [IS, H]). act [N, K + 1, max(I, IS)].
constexpr int WPR = H * BITS / 32;  // uint32 words per weight row
constexpr int GPR = H / GS;  // groups per weight row
constexpr int SLOTS = K + (HAS_SHARED ? 1 : 0);
constexpr int IMAX = I > IS ? I : IS;
uint lane = thread_index_in_simdgroup;
uint r = thread_position_in_grid.y;
uint n = thread_position_in_grid.z / SLOTS;
uint slot = thread_position_in_grid.z % SLOTS;

auto xn = x + size_t(n) * H;
float gate;
float up;
if (slot < uint(K)) {
  if (r >= uint(I)) {
    return;
  }
  size_t e = inds[n * K + slot];
  size_t rg = e * 2 * I + r, ru = e * 2 * I + I + r;
  gate = qdot_lane<T, BITS, GS, false>(xn, xn, w + rg * WPR, scales + rg * GPR, biases + rg * GPR, H, lane);
  up = qdot_lane<T, BITS, GS, false>(xn, xn, w + ru * WPR, scales + ru * GPR, biases + ru * GPR, H, lane);
} else {  // the shared expert's weights: their own inputs, possibly in another address space
  if (r >= uint(IS)) {
    return;
  }
  size_t o = r;
  gate = qdot_lane<T, BITS, GS, false>(xn, xn, shared_gate_w + o * WPR, shared_gate_scales + o * GPR,
                                       shared_gate_biases + o * GPR, H, lane);
  up = qdot_lane<T, BITS, GS, false>(xn, xn, shared_up_w + o * WPR, shared_up_scales + o * GPR,
                                     shared_up_biases + o * GPR, H, lane);
}
gate = simd_sum(gate);
up = simd_sum(up);
if (lane == 0) {
  act[(size_t(n) * SLOTS + slot) * IMAX + r] = T(silu_f(float(T(gate))) * float(T(up)));
}
