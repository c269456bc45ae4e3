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

const device uint32_t* wg;
const device uint32_t* wu;
const device ST* sg;
const device ST* su;
const device ST* bg;
const device ST* bu;
if (slot < uint(K)) {
  if (r >= uint(I)) {
    return;
  }
  size_t e = inds[n * K + slot];
  size_t rg = e * 2 * I + r, ru = e * 2 * I + I + r;
  wg = w + rg * WPR;
  wu = w + ru * WPR;
  sg = scales + rg * GPR;
  su = scales + ru * GPR;
  bg = biases + rg * GPR;
  bu = biases + ru * GPR;
} else {
  if (r >= uint(IS)) {
    return;
  }
  wg = shared_gate_w + size_t(r) * WPR;
  wu = shared_up_w + size_t(r) * WPR;
  sg = shared_gate_scales + size_t(r) * GPR;
  su = shared_up_scales + size_t(r) * GPR;
  bg = shared_gate_biases + size_t(r) * GPR;
  bu = shared_up_biases + size_t(r) * GPR;
}
const device T* xn = x + size_t(n) * H;
float gate = simd_sum(qdot_lane<T, ST, BITS, GS>(xn, wg, sg, bg, H, lane));
float up = simd_sum(qdot_lane<T, ST, BITS, GS>(xn, wu, su, bu, H, lane));
if (lane == 0) {
  act[(size_t(n) * SLOTS + slot) * IMAX + r] = T(silu_f(float(T(gate))) * float(T(up)));
}
