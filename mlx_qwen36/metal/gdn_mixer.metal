// The whole Gated DeltaNet mixer for T steps in one launch: causal depthwise conv + SiLU over the pre-conv qkv
// rows, q/k L2 norms, the gates (g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)), the gated delta rule,
// and the gated RMSNorm of the output. One threadgroup per (batch row, value head); NSG SIMD-groups each own
// DV / NSG columns of the state, a column's DK entries spread over the 32 lanes (registers), so the state is read
// and written once per launch. State layout [B, HV, DV, DK] fp32: a column is contiguous, and lanes read it
// coalesced. A masked step (HAS_MASK) feeds a zero row to the conv, leaves the state as it is and outputs 0.
// STEPS also writes the state after every step (steps [B, T, HV, DV, DK]) for speculative rollback.
constexpr int G = HV / HK;
constexpr int C = 2 * HK * DK + HV * DV;
constexpr int NK = DK / 32;
constexpr int CPS = DV / NSG;

threadgroup float q_s[DK];
threadgroup float k_s[DK];
threadgroup float v_s[DV];
threadgroup float o_s[DV];
threadgroup float red_q[NSG];
threadgroup float red_k[NSG];
threadgroup float red_o[NSG];

uint tid = thread_index_in_threadgroup;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint nthreads = threads_per_threadgroup.x;
uint bh = threadgroup_position_in_grid.z;
uint b = bh / HV;
uint hv = bh % HV;
uint hk = hv / G;
int T = qkv_shape[1];

const device InT* qkv_b = qkv + size_t(b) * T * C;
const device InT* past = conv_state + size_t(b) * (KC - 1) * C;
float decay_scale = -metal::exp(float(A_log[hv]));
float bias = float(dt_bias[hv]);

// Row r of [conv_state; qkv] for channel ch (masked rows are zeros).
#define WINDOW(r, ch) ((r) < KC - 1 ? float(past[(r) * C + (ch)]) \
    : ((HAS_MASK && !mask[size_t(b) * T + (r) - (KC - 1)]) ? 0.0f : float(qkv_b[size_t((r) - (KC - 1)) * C + (ch)])))

float S[CPS][NK];
for (int j = 0; j < CPS; j++) {
  const device float* col = state + (size_t(bh) * DV + sg * CPS + j) * DK;
  for (int i = 0; i < NK; i++) {
    S[j][i] = col[lane + 32 * i];
  }
}

for (int t = 0; t < T; t++) {
  bool live = !HAS_MASK || mask[size_t(b) * T + t];
  // conv + SiLU for this head's q, k (key head hk) and v channels, rounded to InT as the ops path rounds them.
  float qq = 0.0f, kk = 0.0f;
  for (uint i = tid; i < uint(DK); i += nthreads) {
    int cq = hk * DK + i, ck = HK * DK + hk * DK + i;
    float aq = 0.0f, ak = 0.0f;
    for (int w = 0; w < KC; w++) {
      aq += float(conv_w[cq * KC + w]) * WINDOW(t + w, cq);
      ak += float(conv_w[ck * KC + w]) * WINDOW(t + w, ck);
    }
    float q = float(InT(silu_f(float(InT(aq)))));
    float k = float(InT(silu_f(float(InT(ak)))));
    q_s[i] = q;
    k_s[i] = k;
    qq += q * q;
    kk += k * k;
  }
  for (uint i = tid; i < uint(DV); i += nthreads) {
    int cv = 2 * HK * DK + hv * DV + i;
    float av = 0.0f;
    for (int w = 0; w < KC; w++) {
      av += float(conv_w[cv * KC + w]) * WINDOW(t + w, cv);
    }
    v_s[i] = float(InT(silu_f(float(InT(av)))));
  }
  qq = simd_sum(qq);
  kk = simd_sum(kk);
  if (lane == 0) {
    red_q[sg] = qq;
    red_k[sg] = kk;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  float sq = 0.0f, sk = 0.0f;
  for (int i = 0; i < NSG; i++) {
    sq += red_q[i];
    sk += red_k[i];
  }
  float q_scale = metal::rsqrt(sq + 1e-6f) * metal::rsqrt(float(DK));
  float k_scale = metal::rsqrt(sk + 1e-6f);
  size_t row = size_t(b) * T + t;
  float g = live ? decay_scale * softplus_f(float(a[row * HV + hv]) + bias) : 0.0f;
  float beta = live ? sigmoid_f(float(b_in[row * HV + hv])) : 0.0f;
  float decay = metal::exp(g);

  for (int j = 0; j < CPS; j++) {
    int col = sg * CPS + j;
    float kv = 0.0f;
    for (int i = 0; i < NK; i++) {
      S[j][i] *= decay;
      kv += S[j][i] * k_s[lane + 32 * i] * k_scale;
    }
    kv = simd_sum(kv);
    float delta = (v_s[col] - kv) * beta;
    float o = 0.0f;
    for (int i = 0; i < NK; i++) {
      S[j][i] += k_s[lane + 32 * i] * k_scale * delta;
      o += S[j][i] * q_s[lane + 32 * i] * q_scale;
    }
    o = simd_sum(o);
    if (lane == 0) {
      o_s[col] = float(InT(o));
    }
    if (STEPS) {
      device float* out = steps + ((row * HV + hv) * DV + col) * DK;
      for (int i = 0; i < NK; i++) {
        out[lane + 32 * i] = S[j][i];
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // Gated RMSNorm over the DV outputs of this head: rms_norm(o) * w (rounded to InT), times SiLU(z).
  float oo = 0.0f;
  for (uint i = tid; i < uint(DV); i += nthreads) {
    oo += o_s[i] * o_s[i];
  }
  oo = simd_sum(oo);
  if (lane == 0) {
    red_o[sg] = oo;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float so = 0.0f;
  for (int i = 0; i < NSG; i++) {
    so += red_o[i];
  }
  float inv_rms = metal::rsqrt(so / float(DV) + eps);
  for (uint i = tid; i < uint(DV); i += nthreads) {
    size_t at = row * HV * DV + hv * DV + i;
    float n = float(InT(o_s[i] * inv_rms * float(norm_w[i])));
    y[at] = live ? InT(n * silu_f(float(z[at]))) : InT(0.0f);
  }
}

for (int j = 0; j < CPS; j++) {
  device float* col = state_out + (size_t(bh) * DV + sg * CPS + j) * DK;
  for (int i = 0; i < NK; i++) {
    col[lane + 32 * i] = S[j][i];
  }
}

// The new conv state: the last KC - 1 rows of [conv_state; qkv]. Key-head channels are written by the first value
// head of their group only.
device InT* conv_b = conv_out + size_t(b) * (KC - 1) * C;
for (int r = 0; r < KC - 1; r++) {
  if (hv % G == 0) {
    for (uint i = tid; i < uint(DK); i += nthreads) {
      int cq = hk * DK + i, ck = HK * DK + hk * DK + i;
      conv_b[r * C + cq] = InT(WINDOW(T + r, cq));
      conv_b[r * C + ck] = InT(WINDOW(T + r, ck));
    }
  }
  for (uint i = tid; i < uint(DV); i += nthreads) {
    int cv = 2 * HK * DK + hv * DV + i;
    conv_b[r * C + cv] = InT(WINDOW(T + r, cv));
  }
}
#undef WINDOW
