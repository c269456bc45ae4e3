// Helpers shared by the mlx_qwen36 kernels (passed to mx.fast.metal_kernel as `header`).
// The subset of MSL these kernels keep to is written down in README.md.

inline float silu_f(float x) {
  return x / (1.0f + metal::exp(-x));
}

inline float softplus_f(float x) {
  // log(1 + e^x) without overflow, as mlx.nn.softplus (logaddexp(x, 0)).
  return metal::max(x, 0.0f) + metal::log(1.0f + metal::exp(-metal::abs(x)));
}

inline float sigmoid_f(float x) {
  return 1.0f / (1.0f + metal::exp(-x));
}

// One lane's share of x' . dequant(row) for an affine-quantized row of n inputs (uint32 words holding 32/BITS
// values each, lowest bits first; w = scale * q + bias per group of GS inputs). Lanes take words lane, lane + 32, ...
// With GATED, x' = x * sigmoid(gate), each factor rounded to T as the ops path rounds it; otherwise x' = x.
// The pointers are template parameters so that any address space binds: MLX passes an input of fewer than 8
// elements as `constant`, and Metal does not convert between address spaces.
template <typename T, int BITS, int GS, bool GATED, typename XP, typename GP, typename WP, typename SP>
inline float qdot_lane(XP x, GP gate, WP w, SP scales, SP biases, int n, uint lane) {
  constexpr int PER_WORD = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  float acc = 0.0f;
  for (int word = int(lane); word < n / PER_WORD; word += 32) {
    int first = word * PER_WORD;
    uint32_t packed = w[word];
    float xq = 0.0f;
    float xs = 0.0f;
    for (int v = 0; v < PER_WORD; v++) {
      float xv = float(x[first + v]);
      if (GATED) {
        xv = float(T(xv * float(T(sigmoid_f(float(gate[first + v]))))));
      }
      xq += xv * float((packed >> (v * BITS)) & MASK);
      xs += xv;
    }
    int group = first / GS;
    acc += float(scales[group]) * xq + float(biases[group]) * xs;
  }
  return acc;
}
