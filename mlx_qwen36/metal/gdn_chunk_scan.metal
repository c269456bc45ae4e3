// The sequential part of the chunk-parallel gated delta rule (prefill): the n chunks of one (batch row, head), one
// after another, in one launch. Everything batched over chunks (the UT transform's W and U, the decayed queries,
// the masked Q·Kᵀ ⊙ Γ, the decayed keys) is computed before, by matmuls; per chunk c, with S the state at its
// start ([DK, DV], held here as DV columns of DK entries):
//   V' = U − W·S,   O = exp(G)·Q·S + (Q·Kᵀ ⊙ Γ)·V',   S ← exp(G_C)·S + (exp(G_C − G)·K)ᵀ·V'.
// reads [B, H, n, 2C, DK] (W rows, then exp(G)·Q rows), u [B, H, n, C, DV], qk [B, H, n, C, C], k_dec
// [B, H, n, C, DK], decay [B, H, n], state [B, H, DV, DK]; o [B, H, n, C, DV], state_out [B, H, DV, DK], all fp32.
// NSG SIMD-groups each own CPS = DV / NSG columns of S, a column's DK entries spread over the 32 lanes; a SIMD-group
// keeps the V' of its columns distributed over its lanes (row 32 m + l in lane l), so no threadgroup memory and
// no barrier is needed.
constexpr int NK = DK / 32;
constexpr int CPS = DV / NSG;
constexpr int CL = C / 32;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint bh = threadgroup_position_in_grid.z;
int n = reads_shape[2];

float S[CPS][NK];
for (int j = 0; j < CPS; j++) {
  auto col = state + (size_t(bh) * DV + sg * CPS + j) * DK;
  for (int i = 0; i < NK; i++) {
    S[j][i] = col[lane + 32 * i];
  }
}

for (int c = 0; c < n; c++) {
  size_t ch = size_t(bh) * n + c;
  auto rd = reads + ch * 2 * C * DK;
  auto uc = u + ch * C * DV;
  auto qc = qk + ch * C * C;
  auto kc = k_dec + ch * C * DK;
  auto oc = o + ch * C * DV;

  // V' = U − W·S
  float vn[CPS][CL];
  for (int m = 0; m < CL; m++) {
    for (int l = 0; l < 32; l++) {
      int r = 32 * m + l;
      float w[NK];
      for (int i = 0; i < NK; i++) {
        w[i] = rd[size_t(r) * DK + lane + 32 * i];
      }
      for (int j = 0; j < CPS; j++) {
        float p = 0.0f;
        for (int i = 0; i < NK; i++) {
          p += w[i] * S[j][i];
        }
        p = simd_sum(p);
        if (lane == uint(l)) {
          vn[j][m] = uc[size_t(r) * DV + sg * CPS + j] - p;
        }
      }
    }
  }

  // O = exp(G)·Q·S + (Q·Kᵀ ⊙ Γ)·V', with the state at the chunk's start
  for (int r = 0; r < C; r++) {
    float qr[NK];
    for (int i = 0; i < NK; i++) {
      qr[i] = rd[size_t(C + r) * DK + lane + 32 * i];
    }
    for (int j = 0; j < CPS; j++) {
      float p = 0.0f;
      for (int i = 0; i < NK; i++) {
        p += qr[i] * S[j][i];
      }
      for (int m = 0; m < CL; m++) {
        p += qc[size_t(r) * C + 32 * m + lane] * vn[j][m];
      }
      p = simd_sum(p);
      if (lane == 0) {
        oc[size_t(r) * DV + sg * CPS + j] = p;
      }
    }
  }

  // S ← exp(G_C)·S + (exp(G_C − G)·K)ᵀ·V'
  float d = decay[ch];
  for (int j = 0; j < CPS; j++) {
    for (int i = 0; i < NK; i++) {
      S[j][i] *= d;
    }
  }
  for (int m = 0; m < CL; m++) {
    for (int l = 0; l < 32; l++) {
      int s = 32 * m + l;
      float kr[NK];
      for (int i = 0; i < NK; i++) {
        kr[i] = kc[size_t(s) * DK + lane + 32 * i];
      }
      for (int j = 0; j < CPS; j++) {
        float vs = simd_broadcast(vn[j][m], ushort(l));
        for (int i = 0; i < NK; i++) {
          S[j][i] += kr[i] * vs;
        }
      }
    }
  }
}

for (int j = 0; j < CPS; j++) {
  auto col = state_out + (size_t(bh) * DV + sg * CPS + j) * DK;
  for (int i = 0; i < NK; i++) {
    col[lane + 32 * i] = S[j][i];
  }
}
