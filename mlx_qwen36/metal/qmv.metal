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
const device uint32_t* w;
const device ST* s;
const device ST* bi;
uint row = r;
if (row < uint(R0)) {
  w = w0; s = s0; bi = b0;
} else if (row < uint(R0 + R1)) {
  row -= R0; w = w1; s = s1; bi = b1;
} else if (row < uint(R0 + R1 + R2)) {
  row -= R0 + R1; w = w2; s = s2; bi = b2;
} else {
  row -= R0 + R1 + R2; w = w3; s = s3; bi = b3;
}
w += size_t(row) * WPR;
s += size_t(row) * GPR;
bi += size_t(row) * GPR;

constexpr int PER_WORD = 32 / BITS;
constexpr uint32_t MASK = (1u << BITS) - 1u;
const device T* xn = x + size_t(n) * H;
const device T* gn = gate + size_t(n) * H;
float acc = 0.0f;
for (int word = int(lane); word < WPR; word += 32) {
  int first = word * PER_WORD;
  uint32_t packed = w[word];
  float xq = 0.0f;
  float xs = 0.0f;
  for (int v = 0; v < PER_WORD; v++) {
    float xv = float(xn[first + v]);
    if (GATED) {
      xv = float(T(xv * float(T(sigmoid_f(float(gn[first + v]))))));
    }
    xq += xv * float((packed >> (v * BITS)) & MASK);
    xs += xv;
  }
  int group = first / GS;
  acc += float(s[group]) * xq + float(bi[group]) * xs;
}
acc = simd_sum(acc);
if (lane == 0) {
  float out = RESIDUAL ? float(residual[size_t(n) * R + r]) + float(T(acc)) : acc;
  y[size_t(n) * R + r] = T(out);
}
