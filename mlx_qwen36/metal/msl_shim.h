// msl_shim.h: just enough of the Metal Shading Language, as C++20, to run the kernels passed to
// mx.fast.metal_kernel on the CPU (see mlx_qwen36/metal/emulator.py, which drives it).
//
// Every GPU thread is a fiber. The fibers of one threadgroup run on one OS thread, cooperatively: a fiber runs
// until it reaches a threadgroup_barrier, a SIMD collective or its end. A barrier is released when every live
// (launched, not yet returned) thread of the threadgroup waits at it; a collective is released when every live
// lane of the 32-lane SIMD-group waits at the same call site (std::source_location), and its result is then
// computed for all of them at once, so collectives run in lockstep. Anything else is reported as an error.
//
// The emulator rewrites the kernel text before it reaches this header: `[[...]]` attributes are removed,
// `threadgroup` storage declarations become `static thread_local` (one OS thread runs one threadgroup at a time)
// and the remaining `threadgroup` qualifiers are removed. The address spaces device / constant / thread are
// empty macros, defined at the very end so that nothing in here is affected by them.
#pragma once

#include <bit>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <source_location>
#include <type_traits>
#include <utility>

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__) || defined(EMU_USE_UCONTEXT)
#define EMU_UCONTEXT 1
#include <ucontext.h>
#endif

#pragma GCC diagnostic ignored "-Wliteral-suffix"

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;

///////////////////////////////////////////////////////////////////////////////////////////////////////////////////
// bfloat (Metal 3.1 semantics: implicit conversion to float, explicit from float/half; arithmetic rounds to bfloat)
///////////////////////////////////////////////////////////////////////////////////////////////////////////////////

struct bfloat16_t;

namespace emu {
template <class T> struct is_vec : std::false_type {};
template <class T> inline constexpr bool is_float_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, _Float16> ||
    std::is_same_v<T, bfloat16_t>;
template <class T> inline constexpr bool is_scalar_v = std::is_arithmetic_v<T> || is_float_v<T>;
template <class T> concept FloatLike = is_float_v<std::remove_cvref_t<T>>;
template <class T> concept Scalar = is_scalar_v<std::remove_cvref_t<T>>;
template <class T> concept Integral = std::is_integral_v<std::remove_cvref_t<T>>;

constexpr uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                     // round to nearest even
}
constexpr float bf16_bits_to_f32(uint16_t b) { return std::bit_cast<float>(uint32_t(b) << 16); }
}  // namespace emu

struct bfloat16_t {
  uint16_t bits_;
  bfloat16_t() = default;
  template <emu::Integral U> constexpr bfloat16_t(U v) : bits_(emu::f32_to_bf16_bits(float(v))) {}
  template <emu::FloatLike U>
    requires(!std::is_same_v<std::remove_cvref_t<U>, bfloat16_t>)
  constexpr explicit bfloat16_t(U v) : bits_(emu::f32_to_bf16_bits(float(v))) {}
  template <class U>
    requires(std::is_same_v<U, float> || std::is_same_v<U, double>)
  constexpr operator U() const { return U(emu::bf16_bits_to_f32(bits_)); }
  template <class U>
    requires(std::is_integral_v<U> || std::is_same_v<U, _Float16>)
  constexpr explicit operator U() const { return U(emu::bf16_bits_to_f32(bits_)); }
  static constexpr bfloat16_t from_bits(uint16_t b) {
    bfloat16_t r{};
    r.bits_ = b;
    return r;
  }
  constexpr float f() const { return emu::bf16_bits_to_f32(bits_); }
  template <emu::Scalar U> constexpr bfloat16_t& operator+=(U o) { return *this = bfloat16_t(f() + float(o)); }
  template <emu::Scalar U> constexpr bfloat16_t& operator-=(U o) { return *this = bfloat16_t(f() - float(o)); }
  template <emu::Scalar U> constexpr bfloat16_t& operator*=(U o) { return *this = bfloat16_t(f() * float(o)); }
  template <emu::Scalar U> constexpr bfloat16_t& operator/=(U o) { return *this = bfloat16_t(f() / float(o)); }
  constexpr bfloat16_t& operator++() { return *this += 1; }
  constexpr bfloat16_t& operator--() { return *this -= 1; }
  constexpr bfloat16_t operator++(int) { bfloat16_t t = *this; *this += 1; return t; }
  constexpr bfloat16_t operator--(int) { bfloat16_t t = *this; *this -= 1; return t; }
};
typedef bfloat16_t bfloat;

constexpr bfloat16_t operator-(bfloat16_t a) { return bfloat16_t::from_bits(uint16_t(a.bits_ ^ 0x8000u)); }
constexpr bfloat16_t operator+(bfloat16_t a) { return a; }

// bfloat op bfloat -> bfloat; bfloat op integer -> bfloat; bfloat op float/double/half -> float.
#define EMU_BF_BINOP(op)                                                                                    \
  constexpr bfloat16_t operator op(bfloat16_t a, bfloat16_t b) { return bfloat16_t(a.f() op b.f()); }      \
  template <emu::Integral U> constexpr bfloat16_t operator op(bfloat16_t a, U b) {                         \
    return bfloat16_t(a.f() op float(b));                                                                  \
  }                                                                                                        \
  template <emu::Integral U> constexpr bfloat16_t operator op(U a, bfloat16_t b) {                         \
    return bfloat16_t(float(a) op b.f());                                                                  \
  }                                                                                                        \
  template <emu::FloatLike U>                                                                              \
    requires(!std::is_same_v<std::remove_cvref_t<U>, bfloat16_t>)                                          \
  constexpr float operator op(bfloat16_t a, U b) { return a.f() op float(b); }                             \
  template <emu::FloatLike U>                                                                              \
    requires(!std::is_same_v<std::remove_cvref_t<U>, bfloat16_t>)                                          \
  constexpr float operator op(U a, bfloat16_t b) { return float(a) op b.f(); }
EMU_BF_BINOP(+)
EMU_BF_BINOP(-)
EMU_BF_BINOP(*)
EMU_BF_BINOP(/)
#undef EMU_BF_BINOP

#define EMU_BF_CMP(op)                                                                                      \
  constexpr bool operator op(bfloat16_t a, bfloat16_t b) { return a.f() op b.f(); }                        \
  template <emu::Scalar U>                                                                                 \
    requires(!std::is_same_v<std::remove_cvref_t<U>, bfloat16_t>)                                          \
  constexpr bool operator op(bfloat16_t a, U b) { return a.f() op float(b); }                              \
  template <emu::Scalar U>                                                                                 \
    requires(!std::is_same_v<std::remove_cvref_t<U>, bfloat16_t>)                                          \
  constexpr bool operator op(U a, bfloat16_t b) { return float(a) op b.f(); }
EMU_BF_CMP(==)
EMU_BF_CMP(!=)
EMU_BF_CMP(<)
EMU_BF_CMP(>)
EMU_BF_CMP(<=)
EMU_BF_CMP(>=)
#undef EMU_BF_CMP

constexpr _Float16 operator""h(long double v) { return _Float16(v); }
constexpr _Float16 operator""h(unsigned long long v) { return _Float16(v); }
constexpr bfloat16_t operator""bf(long double v) { return bfloat16_t(float(v)); }
constexpr bfloat16_t operator""bf(unsigned long long v) { return bfloat16_t(float(v)); }

typedef half float16_t;

// MLX's complex64_t, minimal.
struct complex64_t {
  float real;
  float imag;
  constexpr complex64_t(float r = 0.0f, float i = 0.0f) : real(r), imag(i) {}
  friend constexpr complex64_t operator+(complex64_t a, complex64_t b) { return {a.real + b.real, a.imag + b.imag}; }
  friend constexpr complex64_t operator-(complex64_t a, complex64_t b) { return {a.real - b.real, a.imag - b.imag}; }
  friend constexpr complex64_t operator*(complex64_t a, complex64_t b) {
    return {a.real * b.real - a.imag * b.imag, a.real * b.imag + a.imag * b.real};
  }
  friend constexpr bool operator==(complex64_t a, complex64_t b) { return a.real == b.real && a.imag == b.imag; }
  complex64_t& operator+=(complex64_t o) { return *this = *this + o; }
};

namespace emu {
// The type of a mixed scalar expression, Metal-like: integers < half, bfloat < float < double; half with bfloat
// gives float.
template <class T> inline constexpr int frank = std::is_same_v<T, double> ? 4
                                              : std::is_same_v<T, float>  ? 3
                                              : (std::is_same_v<T, _Float16> || std::is_same_v<T, bfloat16_t>) ? 2
                                                                                                                 : 0;
template <class T, class U> struct promote {
  using type = std::conditional_t<
      std::is_same_v<T, U>, T,
      std::conditional_t<(frank<T> == 0 && frank<U> == 0), std::common_type_t<T, U>,
                         std::conditional_t<(frank<T> == 2 && frank<U> == 2), float,
                                            std::conditional_t<(frank<T> >= frank<U>), T, U>>>>;
};
template <class T, class U> using promote_t = typename promote<std::remove_cvref_t<T>, std::remove_cvref_t<U>>::type;
}  // namespace emu

///////////////////////////////////////////////////////////////////////////////////////////////////////////////////
// Vectors: vec<T, N> with .x .y .z .w and [i], elementwise operators (no swizzles). float3 has the size of float4.
///////////////////////////////////////////////////////////////////////////////////////////////////////////////////

namespace metal {

template <class T, int N> struct vec_base;
template <class T> struct alignas(2 * sizeof(T)) vec_base<T, 2> { T x, y; };
template <class T> struct alignas(4 * sizeof(T)) vec_base<T, 3> { T x, y, z; };
template <class T> struct alignas(4 * sizeof(T)) vec_base<T, 4> { T x, y, z, w; };

template <class T, int N> struct vec;
}  // namespace metal

namespace emu {
template <class T, int N> struct is_vec<metal::vec<T, N>> : std::true_type {};
template <class T> inline constexpr bool is_vec_v = is_vec<std::remove_cvref_t<T>>::value;
template <class T> struct ncomp { static constexpr int value = 1; };
template <class T, int N> struct ncomp<metal::vec<T, N>> { static constexpr int value = N; };
template <class T> inline constexpr int ncomp_v = ncomp<std::remove_cvref_t<T>>::value;
}  // namespace emu

namespace metal {

template <class T, int N> struct vec : vec_base<T, N> {
  using value_type = T;
  vec() = default;
  template <emu::Scalar U> constexpr vec(U s) {
    for (int i = 0; i < N; ++i) (*this)[i] = T(s);
  }
  template <class U>
    requires(!std::is_same_v<U, T>)
  constexpr explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; ++i) (*this)[i] = T(o[i]);
  }
  template <class... A>
    requires(sizeof...(A) >= 2 && (emu::ncomp_v<A> + ...) == N &&
             ((emu::is_scalar_v<std::remove_cvref_t<A>> || emu::is_vec_v<A>) && ...))
  constexpr vec(const A&... a) {
    int k = 0;
    (fill(k, a), ...);
  }
  constexpr T& operator[](int i) {
    if (std::is_constant_evaluated()) return comp(i);
    return (&this->x)[i];
  }
  constexpr const T& operator[](int i) const {
    if (std::is_constant_evaluated()) return const_cast<vec*>(this)->comp(i);
    return (&this->x)[i];
  }
  template <class U> constexpr vec& operator+=(const U& o) { return *this = *this + o; }
  template <class U> constexpr vec& operator-=(const U& o) { return *this = *this - o; }
  template <class U> constexpr vec& operator*=(const U& o) { return *this = *this * o; }
  template <class U> constexpr vec& operator/=(const U& o) { return *this = *this / o; }
  template <class U> constexpr vec& operator%=(const U& o) { return *this = *this % o; }
  template <class U> constexpr vec& operator&=(const U& o) { return *this = *this & o; }
  template <class U> constexpr vec& operator|=(const U& o) { return *this = *this | o; }
  template <class U> constexpr vec& operator^=(const U& o) { return *this = *this ^ o; }
  template <class U> constexpr vec& operator<<=(const U& o) { return *this = *this << o; }
  template <class U> constexpr vec& operator>>=(const U& o) { return *this = *this >> o; }

 private:
  constexpr T& comp(int i) {
    if constexpr (N == 2) {
      return i == 0 ? this->x : this->y;
    } else if constexpr (N == 3) {
      return i == 0 ? this->x : i == 1 ? this->y : this->z;
    } else {
      return i == 0 ? this->x : i == 1 ? this->y : i == 2 ? this->z : this->w;
    }
  }
  template <class A> constexpr void fill(int& k, const A& a) {
    if constexpr (emu::is_vec_v<A>) {
      for (int j = 0; j < emu::ncomp_v<A>; ++j) (*this)[k++] = T(a[j]);
    } else {
      (*this)[k++] = T(a);
    }
  }
};

#define EMU_VEC_BINOP(op)                                                                                   \
  template <class T, int N> constexpr vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {      \
    vec<T, N> r;                                                                                           \
    for (int i = 0; i < N; ++i) r[i] = T(a[i] op b[i]);                                                    \
    return r;                                                                                              \
  }                                                                                                        \
  template <class T, int N, emu::Scalar U> constexpr vec<T, N> operator op(const vec<T, N>& a, U b) {      \
    vec<T, N> r;                                                                                           \
    for (int i = 0; i < N; ++i) r[i] = T(a[i] op T(b));                                                    \
    return r;                                                                                              \
  }                                                                                                        \
  template <class T, int N, emu::Scalar U> constexpr vec<T, N> operator op(U a, const vec<T, N>& b) {      \
    vec<T, N> r;                                                                                           \
    for (int i = 0; i < N; ++i) r[i] = T(T(a) op b[i]);                                                    \
    return r;                                                                                              \
  }
EMU_VEC_BINOP(+)
EMU_VEC_BINOP(-)
EMU_VEC_BINOP(*)
EMU_VEC_BINOP(/)
EMU_VEC_BINOP(%)
EMU_VEC_BINOP(&)
EMU_VEC_BINOP(|)
EMU_VEC_BINOP(^)
EMU_VEC_BINOP(<<)
EMU_VEC_BINOP(>>)
#undef EMU_VEC_BINOP

#define EMU_VEC_CMP(op)                                                                                     \
  template <class T, int N> constexpr vec<bool, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {   \
    vec<bool, N> r;                                                                                        \
    for (int i = 0; i < N; ++i) r[i] = a[i] op b[i];                                                       \
    return r;                                                                                              \
  }                                                                                                        \
  template <class T, int N, emu::Scalar U> constexpr vec<bool, N> operator op(const vec<T, N>& a, U b) {   \
    vec<bool, N> r;                                                                                        \
    for (int i = 0; i < N; ++i) r[i] = a[i] op T(b);                                                       \
    return r;                                                                                              \
  }                                                                                                        \
  template <class T, int N, emu::Scalar U> constexpr vec<bool, N> operator op(U a, const vec<T, N>& b) {   \
    vec<bool, N> r;                                                                                        \
    for (int i = 0; i < N; ++i) r[i] = T(a) op b[i];                                                       \
    return r;                                                                                              \
  }
EMU_VEC_CMP(==)
EMU_VEC_CMP(!=)
EMU_VEC_CMP(<)
EMU_VEC_CMP(>)
EMU_VEC_CMP(<=)
EMU_VEC_CMP(>=)
EMU_VEC_CMP(&&)
EMU_VEC_CMP(||)
#undef EMU_VEC_CMP

template <class T, int N> constexpr vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = T(-a[i]);
  return r;
}
template <class T, int N> constexpr vec<T, N> operator+(const vec<T, N>& a) { return a; }
template <class T, int N> constexpr vec<T, N> operator~(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = T(~a[i]);
  return r;
}
template <class T, int N> constexpr vec<bool, N> operator!(const vec<T, N>& a) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r[i] = !a[i];
  return r;
}

#define EMU_VEC_TYPES(T, name) \
  typedef vec<T, 2> name##2;   \
  typedef vec<T, 3> name##3;   \
  typedef vec<T, 4> name##4;
EMU_VEC_TYPES(float, float)
EMU_VEC_TYPES(half, half)
EMU_VEC_TYPES(bfloat16_t, bfloat)
EMU_VEC_TYPES(int, int)
EMU_VEC_TYPES(uint, uint)
EMU_VEC_TYPES(short, short)
EMU_VEC_TYPES(ushort, ushort)
EMU_VEC_TYPES(char, char)
EMU_VEC_TYPES(uchar, uchar)
EMU_VEC_TYPES(bool, bool)
EMU_VEC_TYPES(long, long)
EMU_VEC_TYPES(ulong, ulong)
#undef EMU_VEC_TYPES

template <class T, int N> constexpr bool all(const vec<T, N>& v) {
  for (int i = 0; i < N; ++i)
    if (!v[i]) return false;
  return true;
}
template <class T, int N> constexpr bool any(const vec<T, N>& v) {
  for (int i = 0; i < N; ++i)
    if (v[i]) return true;
  return false;
}
constexpr bool all(bool b) { return b; }
constexpr bool any(bool b) { return b; }

template <class T, class U> constexpr T as_type(const U& u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: the sizes differ");
  return std::bit_cast<T>(u);
}

///////////////////////////////////////////////////////////////////////////////////////////////////////////////////
// numeric_limits
///////////////////////////////////////////////////////////////////////////////////////////////////////////////////

template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<_Float16> {
  static constexpr bool is_specialized = true, is_signed = true, is_integer = false, has_infinity = true,
                        has_quiet_NaN = true;
  static constexpr int digits = 11;
  static constexpr _Float16 max() { return _Float16(65504.0f); }
  static constexpr _Float16 min() { return _Float16(6.103515625e-05f); }
  static constexpr _Float16 lowest() { return _Float16(-65504.0f); }
  static constexpr _Float16 epsilon() { return _Float16(0.0009765625f); }
  static constexpr _Float16 denorm_min() { return _Float16(5.9604644775390625e-08f); }
  static constexpr _Float16 infinity() { return _Float16(__builtin_inff()); }
  static constexpr _Float16 quiet_NaN() { return _Float16(__builtin_nanf("")); }
};
template <> struct numeric_limits<bfloat16_t> {
  static constexpr bool is_specialized = true, is_signed = true, is_integer = false, has_infinity = true,
                        has_quiet_NaN = true;
  static constexpr int digits = 8;
  static constexpr bfloat16_t max() { return bfloat16_t::from_bits(0x7f7f); }
  static constexpr bfloat16_t min() { return bfloat16_t::from_bits(0x0080); }
  static constexpr bfloat16_t lowest() { return bfloat16_t::from_bits(0xff7f); }
  static constexpr bfloat16_t epsilon() { return bfloat16_t::from_bits(0x3c00); }
  static constexpr bfloat16_t denorm_min() { return bfloat16_t::from_bits(0x0001); }
  static constexpr bfloat16_t infinity() { return bfloat16_t::from_bits(0x7f80); }
  static constexpr bfloat16_t quiet_NaN() { return bfloat16_t::from_bits(0x7fc0); }
};

///////////////////////////////////////////////////////////////////////////////////////////////////////////////////
// Math. Float-like scalars (float, half, bfloat; double computes as float, as Metal has none) and vectors of them.
///////////////////////////////////////////////////////////////////////////////////////////////////////////////////

#define EMU_UNARY(name, expr)                                                                               \
  template <emu::FloatLike T> inline std::remove_cvref_t<T> name(T x_) {                                   \
    using R = std::remove_cvref_t<T>;                                                                      \
    float x = float(x_);                                                                                   \
    return R(expr);                                                                                        \
  }                                                                                                        \
  template <class T, int N> inline vec<T, N> name(const vec<T, N>& v) {                                    \
    vec<T, N> r;                                                                                           \
    for (int i = 0; i < N; ++i) r[i] = name(v[i]);                                                         \
    return r;                                                                                              \
  }
EMU_UNARY(exp, std::exp(x))
EMU_UNARY(exp2, std::exp2(x))
EMU_UNARY(exp10, std::pow(10.0f, x))
EMU_UNARY(log, std::log(x))
EMU_UNARY(log2, std::log2(x))
EMU_UNARY(log10, std::log10(x))
EMU_UNARY(log1p, std::log1p(x))
EMU_UNARY(expm1, std::expm1(x))
EMU_UNARY(sqrt, std::sqrt(x))
EMU_UNARY(rsqrt, 1.0f / std::sqrt(x))
EMU_UNARY(cbrt, std::cbrt(x))
EMU_UNARY(sin, std::sin(x))
EMU_UNARY(cos, std::cos(x))
EMU_UNARY(tan, std::tan(x))
EMU_UNARY(asin, std::asin(x))
EMU_UNARY(acos, std::acos(x))
EMU_UNARY(atan, std::atan(x))
EMU_UNARY(sinh, std::sinh(x))
EMU_UNARY(cosh, std::cosh(x))
EMU_UNARY(tanh, std::tanh(x))
EMU_UNARY(asinh, std::asinh(x))
EMU_UNARY(acosh, std::acosh(x))
EMU_UNARY(atanh, std::atanh(x))
EMU_UNARY(erf, std::erf(x))
EMU_UNARY(erfc, std::erfc(x))
EMU_UNARY(floor, std::floor(x))
EMU_UNARY(ceil, std::ceil(x))
EMU_UNARY(round, std::round(x))
EMU_UNARY(rint, std::nearbyint(x))
EMU_UNARY(trunc, std::trunc(x))
EMU_UNARY(fract, std::fmin(x - std::floor(x), 0x1.fffffep-1f))
EMU_UNARY(fabs, std::fabs(x))
EMU_UNARY(saturate, std::fmin(std::fmax(x, 0.0f), 1.0f))
EMU_UNARY(sign, (x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : std::isnan(x) ? 0.0f : x))
#undef EMU_UNARY

template <emu::FloatLike T> inline std::remove_cvref_t<T> abs(T x) { return fabs(x); }
template <emu::Integral T> inline std::remove_cvref_t<T> abs(T x) {
  if constexpr (std::is_signed_v<std::remove_cvref_t<T>>) return x < 0 ? -x : x;
  else return x;
}
template <class T, int N> inline vec<T, N> abs(const vec<T, N>& v) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = abs(v[i]);
  return r;
}

#define EMU_PRED(name, expr)                                                                                \
  template <emu::FloatLike T> inline bool name(T x_) {                                                     \
    float x = float(x_);                                                                                   \
    return (expr);                                                                                         \
  }                                                                                                        \
  template <class T, int N> inline vec<bool, N> name(const vec<T, N>& v) {                                 \
    vec<bool, N> r;                                                                                        \
    for (int i = 0; i < N; ++i) r[i] = name(v[i]);                                                         \
    return r;                                                                                              \
  }
EMU_PRED(isnan, std::isnan(x))
EMU_PRED(isinf, std::isinf(x))
EMU_PRED(isfinite, std::isfinite(x))
EMU_PRED(isnormal, std::isnormal(x))
EMU_PRED(signbit, std::signbit(x))
#undef EMU_PRED

// Binary functions: scalars of any mix (promoted), vector with vector, vector with scalar.
#define EMU_BINARY(name, fexpr, iexpr)                                                                      \
  template <emu::Scalar T, emu::Scalar U> inline emu::promote_t<T, U> name(T a_, U b_) {                   \
    using R = emu::promote_t<T, U>;                                                                        \
    if constexpr (emu::is_float_v<R>) {                                                                    \
      float a = float(R(a_)), b = float(R(b_));                                                            \
      return R(fexpr);                                                                                     \
    } else {                                                                                               \
      R a = R(a_), b = R(b_);                                                                              \
      return R(iexpr);                                                                                     \
    }                                                                                                      \
  }                                                                                                        \
  template <class T, int N> inline vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b) {                \
    vec<T, N> r;                                                                                           \
    for (int i = 0; i < N; ++i) r[i] = name(a[i], b[i]);                                                   \
    return r;                                                                                              \
  }                                                                                                        \
  template <class T, int N, emu::Scalar U> inline vec<T, N> name(const vec<T, N>& a, U b) {                \
    vec<T, N> r;                                                                                           \
    for (int i = 0; i < N; ++i) r[i] = name(a[i], T(b));                                                   \
    return r;                                                                                              \
  }                                                                                                        \
  template <class T, int N, emu::Scalar U> inline vec<T, N> name(U a, const vec<T, N>& b) {                \
    vec<T, N> r;                                                                                           \
    for (int i = 0; i < N; ++i) r[i] = name(T(a), b[i]);                                                   \
    return r;                                                                                              \
  }
EMU_BINARY(max, std::fmax(a, b), (a < b ? b : a))
EMU_BINARY(min, std::fmin(a, b), (b < a ? b : a))
EMU_BINARY(fmax, std::fmax(a, b), (a < b ? b : a))
EMU_BINARY(fmin, std::fmin(a, b), (b < a ? b : a))
EMU_BINARY(pow, std::pow(a, b), R(std::pow(double(a), double(b))))
EMU_BINARY(powr, std::pow(a, b), R(std::pow(double(a), double(b))))
EMU_BINARY(fmod, std::fmod(a, b), a % b)
EMU_BINARY(atan2, std::atan2(a, b), R(std::atan2(double(a), double(b))))
EMU_BINARY(copysign, std::copysign(a, b), R(std::copysign(double(a), double(b))))
EMU_BINARY(fdim, std::fdim(a, b), (a > b ? a - b : R(0)))
EMU_BINARY(step, (b < a ? 0.0f : 1.0f), (b < a ? R(0) : R(1)))
EMU_BINARY(divide, a / b, a / b)
#undef EMU_BINARY

template <class T, class U, class V> inline auto clamp(T x, U lo, V hi) { return min(max(x, lo), hi); }
template <class T, class U, class V> inline auto fma(T a, U b, V c) {
  if constexpr (emu::is_vec_v<T> || emu::is_vec_v<U> || emu::is_vec_v<V>) {
    return a * b + c;
  } else {
    using R = emu::promote_t<emu::promote_t<T, U>, V>;
    if constexpr (emu::is_float_v<R>) return R(std::fma(float(R(a)), float(R(b)), float(R(c))));
    else return R(R(a) * R(b) + R(c));
  }
}
template <class T, class U, class V> inline auto mad(T a, U b, V c) { return fma(a, b, c); }
template <class T, class U, class V> inline auto mix(T x, U y, V a) { return x + (y - x) * a; }
template <class T, class U> inline auto select(T a, U b, bool c) {
  if constexpr (std::is_same_v<T, U>) return c ? b : a;
  else {
    using R = emu::promote_t<T, U>;
    return c ? R(b) : R(a);
  }
}
template <class T, int N> inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = c[i] ? b[i] : a[i];
  return r;
}
template <class T, int N> inline T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = T(a[0] * b[0]);
  for (int i = 1; i < N; ++i) s = T(s + a[i] * b[i]);
  return s;
}
template <class T, int N> inline T length(const vec<T, N>& a) { return sqrt(dot(a, a)); }
template <class T, int N> inline vec<T, N> normalize(const vec<T, N>& a) { return a * rsqrt(dot(a, a)); }

namespace precise {
using metal::abs, metal::acos, metal::acosh, metal::asin, metal::asinh, metal::atan, metal::atan2, metal::atanh;
using metal::ceil, metal::clamp, metal::copysign, metal::cos, metal::cosh, metal::divide, metal::exp, metal::exp10;
using metal::exp2, metal::fabs, metal::floor, metal::fma, metal::fmax, metal::fmin, metal::fmod, metal::fract;
using metal::log, metal::log10, metal::log2, metal::max, metal::min, metal::pow, metal::powr, metal::rint;
using metal::round, metal::rsqrt, metal::saturate, metal::sign, metal::sin, metal::sinh, metal::sqrt, metal::tan;
using metal::tanh, metal::trunc, metal::isnan, metal::isinf, metal::isfinite, metal::mix, metal::select;
}  // namespace precise
namespace fast {
using namespace metal::precise;
}

}  // namespace metal

///////////////////////////////////////////////////////////////////////////////////////////////////////////////////
// The fiber runtime
///////////////////////////////////////////////////////////////////////////////////////////////////////////////////

namespace emu {

struct Attrs {
  metal::uint3 thread_position_in_grid, threads_per_grid, threadgroup_position_in_grid, threadgroups_per_grid,
      thread_position_in_threadgroup, threads_per_threadgroup, dispatch_threads_per_threadgroup, grid_origin,
      grid_size;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup,
      threads_per_simdgroup, simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup,
      quadgroup_index_in_threadgroup, quadgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup,
      thread_index_in_quadgroup, thread_execution_width;
};

using Entry = void (*)(void* const* bufs, const Attrs& a);

enum State : int { RUNNABLE = 0, AT_SIMD = 1, AT_BARRIER = 2, DONE = 3 };
constexpr int kSimd = 32;
constexpr size_t kPayload = 128;

struct Fiber;
using OpFn = void (*)(Fiber* const* lanes);  // lanes[32]: the waiting lanes of one SIMD-group, nullptr elsewhere

struct Fiber {
  void* sp;
#ifdef EMU_UCONTEXT
  ucontext_t uc;
#endif
  int state;
  uint32_t tid, lane;
  OpFn op;
  const char* opname;
  const char* file;
  uint32_t line, col;
  int32_t iarg;
  alignas(16) unsigned char in[kPayload];
  alignas(16) unsigned char out[kPayload];
  Attrs attrs;
};

struct Launch;
struct Worker {
  void* sched_sp;
#ifdef EMU_UCONTEXT
  ucontext_t sched_uc;
#endif
  Fiber* cur;
  Launch* L;
  uint64_t gen;  // counts the threadgroups this worker has run
  uint32_t bpos[3];
  volatile int catching;  // a memory fault now is the kernel's: report it
  int fault_sig;
  void* fault_addr;
  sigjmp_buf jb;
  int n_tg_vars;
  void* tg_vars[64];
  uint64_t tg_gen[64];
};

inline thread_local Worker* t_worker = nullptr;

// Called after each threadgroup-memory declaration (inserted by the emulator): the first thread of a threadgroup
// to get there fills the storage with 0xFF bytes (NaN for float, half and bfloat; -1 for integers), as threadgroup
// memory starts out undefined on a GPU and must not silently keep the previous threadgroup's values.
inline void tg_fresh(void* p, size_t n) {
  Worker* w = t_worker;
  for (int i = 0; i < w->n_tg_vars; ++i) {
    if (w->tg_vars[i] == p) {
      if (w->tg_gen[i] != w->gen) {
        w->tg_gen[i] = w->gen;
        std::memset(p, 0xff, n);
      }
      return;
    }
  }
  if (w->n_tg_vars < 64) {
    w->tg_vars[w->n_tg_vars] = p;
    w->tg_gen[w->n_tg_vars++] = w->gen;
    std::memset(p, 0xff, n);
  }
}

#ifndef EMU_UCONTEXT
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the stack pointer
// in *save and switches to the stack `load` (saved by the same function, or prepared by init_stack).
__attribute__((naked, noinline)) static void emu_swap(void** /*save*/, void* /*load*/) {
  asm volatile(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}
// First activation of a fiber: r12 holds the function, r13 its argument.
__attribute__((naked, noinline)) static void emu_trampoline() {
  asm volatile(
      "movq %r13, %rdi\n\t"
      "callq *%r12\n\t"
      "ud2\n\t");
}
#endif

inline void to_scheduler(Fiber* f) {
  Worker* w = t_worker;
#ifdef EMU_UCONTEXT
  swapcontext(&f->uc, &w->sched_uc);
#else
  emu_swap(&f->sp, w->sched_sp);
#endif
}

inline void resume(Worker* w, Fiber* f) {
  w->cur = f;
#ifdef EMU_UCONTEXT
  swapcontext(&w->sched_uc, &f->uc);
#else
  emu_swap(&w->sched_sp, f->sp);
#endif
}

struct Launch {
  Entry entry;
  void* const* bufs;
  uint32_t grid[3], tg[3], ntg[3];
  uint64_t total_tgs;
  size_t stack_size;
  uint64_t next;  // next threadgroup to run (atomic)
  int failed;     // atomic
  char* err;
  size_t errlen;
};

[[noreturn]] static void fiber_main(Fiber* f) {
  Worker* w = t_worker;
  w->L->entry(w->L->bufs, f->attrs);
  f->state = DONE;
  to_scheduler(f);
  __builtin_trap();
}

#ifdef EMU_UCONTEXT
static void uc_entry() { fiber_main(t_worker->cur); }
#endif

inline void init_stack(Fiber* f, char* lo, size_t size) {
#ifdef EMU_UCONTEXT
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = lo;
  f->uc.uc_stack.ss_size = size;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, uc_entry, 0);
#else
  uintptr_t top = (uintptr_t(lo) + size) & ~uintptr_t(15);
  uint64_t* ret = reinterpret_cast<uint64_t*>(top - 24);
  ret[0] = uint64_t(uintptr_t(&emu_trampoline));
  ret[-1] = 0;                                    // rbp
  ret[-2] = 0;                                    // rbx
  ret[-3] = uint64_t(uintptr_t(&fiber_main));     // r12
  ret[-4] = uint64_t(uintptr_t(f));               // r13
  ret[-5] = 0;                                    // r14
  ret[-6] = 0;                                    // r15
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  uint16_t cw;
  asm volatile("fnstcw %0" : "=m"(cw));
  csr[1] = cw;
  std::memcpy(&ret[-7], csr, 8);
  f->sp = &ret[-7];
#endif
}

// Post this lane's payload, wait until the whole SIMD-group is at the same site, return the result.
template <class R, class T>
inline R collective(const T& x, int32_t iarg, OpFn op, const char* name, const std::source_location& loc) {
  static_assert(sizeof(T) <= kPayload && sizeof(R) <= kPayload, "SIMD collective payload too large");
  static_assert(std::is_trivially_copyable_v<T>, "SIMD collective payload must be trivially copyable");
  Worker* w = t_worker;
  Fiber* f = w->cur;
  std::memcpy(f->in, &x, sizeof(T));
  f->iarg = iarg;
  f->op = op;
  f->opname = name;
  f->file = loc.file_name();
  f->line = loc.line();
  f->col = loc.column();
  f->state = AT_SIMD;
  to_scheduler(f);
  R r;
  std::memcpy(&r, f->out, sizeof(R));
  return r;
}

template <class T> inline T get_in(const Fiber* f, int k = 0) {
  T v;
  std::memcpy(&v, f->in + k * sizeof(T), sizeof(T));
  return v;
}
template <class T> inline void set_out(Fiber* f, const T& v) { std::memcpy(f->out, &v, sizeof(T)); }

// The value read from a lane that does not take part (exited, or beyond a partial SIMD-group): NaN for
// floating-point data, 0 otherwise.
template <class T> inline T poison() {
  if constexpr (is_float_v<T>) {
    return T(std::numeric_limits<float>::quiet_NaN());
  } else if constexpr (is_vec_v<T>) {
    return T(poison<typename T::value_type>());
  } else {
    T v;
    std::memset(&v, 0, sizeof(T));
    return v;
  }
}

struct OpSum { template <class T> T operator()(const T& a, const T& b) const { return T(a + b); } };
struct OpProd { template <class T> T operator()(const T& a, const T& b) const { return T(a * b); } };
struct OpMax { template <class T> T operator()(const T& a, const T& b) const { return metal::max(a, b); } };
struct OpMin { template <class T> T operator()(const T& a, const T& b) const { return metal::min(a, b); } };
struct OpAnd { template <class T> T operator()(const T& a, const T& b) const { return T(a & b); } };
struct OpOr { template <class T> T operator()(const T& a, const T& b) const { return T(a | b); } };
struct OpXor { template <class T> T operator()(const T& a, const T& b) const { return T(a ^ b); } };

// Butterfly reduction over segments of W lanes (W = 32: SIMD-group, W = 4: quad), ascending xor distances
// 1, 2, 4, ...; lanes that do not take part are skipped. Every lane gets the same, bitwise identical, result.
template <class T, class C, int W> void op_reduce(Fiber* const* L) {
  for (int s = 0; s < kSimd; s += W) {
    T v[W];
    bool p[W];
    bool any = false;
    for (int i = 0; i < W; ++i) {
      p[i] = L[s + i] != nullptr;
      if (p[i]) v[i] = get_in<T>(L[s + i]), any = true;
    }
    if (!any) continue;
    bool p0[W];
    for (int i = 0; i < W; ++i) p0[i] = p[i];
    for (int off = 1; off < W; off <<= 1) {
      T nv[W];
      bool np[W];
      for (int i = 0; i < W; ++i) {
        int lo = i < (i ^ off) ? i : (i ^ off), hi = lo ^ off;
        if (p[lo] && p[hi]) nv[i] = C()(v[lo], v[hi]);
        else if (p[lo]) nv[i] = v[lo];
        else if (p[hi]) nv[i] = v[hi];
        np[i] = p[lo] || p[hi];
      }
      for (int i = 0; i < W; ++i) {
        p[i] = np[i];
        if (np[i]) v[i] = nv[i];
      }
    }
    for (int i = 0; i < W; ++i)
      if (p0[i]) set_out(L[s + i], v[i]);
  }
}

template <class T, bool Inclusive, bool Product> void op_prefix(Fiber* const* L) {
  T acc = T(Product ? 1 : 0);
  for (int i = 0; i < kSimd; ++i) {
    if (!L[i]) continue;
    T x = get_in<T>(L[i]);
    if (Inclusive) acc = Product ? T(acc * x) : T(acc + x);
    set_out(L[i], acc);
    if (!Inclusive) acc = Product ? T(acc * x) : T(acc + x);
  }
}

enum ShufKind { SH_IDX, SH_XOR, SH_DOWN, SH_UP, SH_ROT_DOWN, SH_ROT_UP, SH_FIRST, SH_FILL_DOWN, SH_FILL_UP };

// W = 32 or 4 (quad_*); lane indices are relative to the W-lane segment.
template <class T, int Kind, int W> void op_shuffle(Fiber* const* L) {
  int first = -1;
  for (int i = 0; i < kSimd; ++i)
    if (L[i]) {
      first = i;
      break;
    }
  for (int i = 0; i < kSimd; ++i) {
    if (!L[i]) continue;
    int base = i & ~(W - 1), r = i & (W - 1);
    long a = L[i]->iarg;
    long src;
    bool own = false, fill = false;
    switch (Kind) {
      case SH_IDX: src = (a >= 0 && a < W) ? base + a : -1; break;
      case SH_XOR: src = (a >= 0 && a < W) ? base + (r ^ a) : -1; break;
      case SH_DOWN: src = base + r + a; own = r + a >= W; break;
      case SH_UP: src = base + r - a; own = r - a < 0; break;
      case SH_ROT_DOWN: src = base + (((r + a) % W) + W) % W; break;
      case SH_ROT_UP: src = base + (((r - a) % W) + W) % W; break;
      case SH_FIRST: src = first; break;
      case SH_FILL_DOWN: fill = r + a >= W; src = fill ? base + r + a - W : base + r + a; break;
      case SH_FILL_UP: fill = r - a < 0; src = fill ? base + r - a + W : base + r - a; break;
      default: src = -1;
    }
    T v;
    if (own) v = get_in<T>(L[i]);
    else if (src >= 0 && src < kSimd && L[src]) v = get_in<T>(L[src], fill ? 1 : 0);
    else v = poison<T>();
    set_out(L[i], v);
  }
}

inline void op_vote_all(Fiber* const* L) {
  bool r = true;
  for (int i = 0; i < kSimd; ++i)
    if (L[i]) r = r && get_in<bool>(L[i]);
  for (int i = 0; i < kSimd; ++i)
    if (L[i]) set_out(L[i], r);
}
inline void op_vote_any(Fiber* const* L) {
  bool r = false;
  for (int i = 0; i < kSimd; ++i)
    if (L[i]) r = r || get_in<bool>(L[i]);
  for (int i = 0; i < kSimd; ++i)
    if (L[i]) set_out(L[i], r);
}
inline void op_ballot(Fiber* const* L) {
  uint64_t m = 0;
  for (int i = 0; i < kSimd; ++i)
    if (L[i] && get_in<bool>(L[i])) m |= uint64_t(1) << i;
  for (int i = 0; i < kSimd; ++i)
    if (L[i]) set_out(L[i], m);
}
inline void op_is_first(Fiber* const* L) {
  bool seen = false;
  for (int i = 0; i < kSimd; ++i)
    if (L[i]) {
      set_out(L[i], !seen);
      seen = true;
    }
}
inline void op_nop(Fiber* const* L) { (void)L; }

}  // namespace emu

///////////////////////////////////////////////////////////////////////////////////////////////////////////////////
// Barriers, SIMD-group and quad-group functions, atomics
///////////////////////////////////////////////////////////////////////////////////////////////////////////////////

namespace metal {

enum class mem_flags : uint {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint(a) | uint(b)); }
constexpr mem_flags operator&(mem_flags a, mem_flags b) { return mem_flags(uint(a) & uint(b)); }

enum thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup, thread_scope_device };

inline void threadgroup_barrier(mem_flags = mem_flags::mem_none,
                                std::source_location loc = std::source_location::current()) {
  emu::Fiber* f = emu::t_worker->cur;
  f->opname = "threadgroup_barrier";
  f->op = nullptr;
  f->file = loc.file_name();
  f->line = loc.line();
  f->col = loc.column();
  f->state = emu::AT_BARRIER;
  emu::to_scheduler(f);
}
inline void simdgroup_barrier(mem_flags = mem_flags::mem_none,
                              std::source_location loc = std::source_location::current()) {
  emu::collective<char>(char(0), 0, &emu::op_nop, "simdgroup_barrier", loc);
}

using SL = std::source_location;

#define EMU_SIMD_REDUCE(name, C, W)                                                                         \
  template <class T> inline T name(T x, SL loc = SL::current()) {                                          \
    return emu::collective<T>(x, 0, &emu::op_reduce<T, emu::C, W>, #name, loc);                            \
  }
EMU_SIMD_REDUCE(simd_sum, OpSum, 32)
EMU_SIMD_REDUCE(simd_product, OpProd, 32)
EMU_SIMD_REDUCE(simd_max, OpMax, 32)
EMU_SIMD_REDUCE(simd_min, OpMin, 32)
EMU_SIMD_REDUCE(simd_and, OpAnd, 32)
EMU_SIMD_REDUCE(simd_or, OpOr, 32)
EMU_SIMD_REDUCE(simd_xor, OpXor, 32)
EMU_SIMD_REDUCE(quad_sum, OpSum, 4)
EMU_SIMD_REDUCE(quad_product, OpProd, 4)
EMU_SIMD_REDUCE(quad_max, OpMax, 4)
EMU_SIMD_REDUCE(quad_min, OpMin, 4)
EMU_SIMD_REDUCE(quad_and, OpAnd, 4)
EMU_SIMD_REDUCE(quad_or, OpOr, 4)
EMU_SIMD_REDUCE(quad_xor, OpXor, 4)
#undef EMU_SIMD_REDUCE
template <class T> inline T simd_prod(T x, SL loc = SL::current()) {
  return emu::collective<T>(x, 0, &emu::op_reduce<T, emu::OpProd, 32>, "simd_prod", loc);
}

#define EMU_SIMD_PREFIX(name, Inc, Prod)                                                                    \
  template <class T> inline T name(T x, SL loc = SL::current()) {                                          \
    return emu::collective<T>(x, 0, &emu::op_prefix<T, Inc, Prod>, #name, loc);                            \
  }
EMU_SIMD_PREFIX(simd_prefix_exclusive_sum, false, false)
EMU_SIMD_PREFIX(simd_prefix_inclusive_sum, true, false)
EMU_SIMD_PREFIX(simd_prefix_exclusive_product, false, true)
EMU_SIMD_PREFIX(simd_prefix_inclusive_product, true, true)
#undef EMU_SIMD_PREFIX

#define EMU_SIMD_SHUFFLE(name, Kind, W)                                                                     \
  template <class T> inline T name(T x, ushort arg, SL loc = SL::current()) {                              \
    return emu::collective<T>(x, int32_t(arg), &emu::op_shuffle<T, emu::Kind, W>, #name, loc);             \
  }
EMU_SIMD_SHUFFLE(simd_shuffle, SH_IDX, 32)
EMU_SIMD_SHUFFLE(simd_broadcast, SH_IDX, 32)
EMU_SIMD_SHUFFLE(simd_shuffle_xor, SH_XOR, 32)
EMU_SIMD_SHUFFLE(simd_shuffle_down, SH_DOWN, 32)
EMU_SIMD_SHUFFLE(simd_shuffle_up, SH_UP, 32)
EMU_SIMD_SHUFFLE(simd_shuffle_rotate_down, SH_ROT_DOWN, 32)
EMU_SIMD_SHUFFLE(simd_shuffle_rotate_up, SH_ROT_UP, 32)
EMU_SIMD_SHUFFLE(quad_shuffle, SH_IDX, 4)
EMU_SIMD_SHUFFLE(quad_broadcast, SH_IDX, 4)
EMU_SIMD_SHUFFLE(quad_shuffle_xor, SH_XOR, 4)
EMU_SIMD_SHUFFLE(quad_shuffle_down, SH_DOWN, 4)
EMU_SIMD_SHUFFLE(quad_shuffle_up, SH_UP, 4)
EMU_SIMD_SHUFFLE(quad_shuffle_rotate_down, SH_ROT_DOWN, 4)
EMU_SIMD_SHUFFLE(quad_shuffle_rotate_up, SH_ROT_UP, 4)
#undef EMU_SIMD_SHUFFLE

template <class T> struct emu_pair { T a, b; };
template <class T> inline T simd_shuffle_and_fill_down(T x, T filling, ushort delta, SL loc = SL::current()) {
  return emu::collective<T>(emu_pair<T>{x, filling}, int32_t(delta), &emu::op_shuffle<T, emu::SH_FILL_DOWN, 32>,
                            "simd_shuffle_and_fill_down", loc);
}
template <class T> inline T simd_shuffle_and_fill_up(T x, T filling, ushort delta, SL loc = SL::current()) {
  return emu::collective<T>(emu_pair<T>{x, filling}, int32_t(delta), &emu::op_shuffle<T, emu::SH_FILL_UP, 32>,
                            "simd_shuffle_and_fill_up", loc);
}
template <class T> inline T simd_broadcast_first(T x, SL loc = SL::current()) {
  return emu::collective<T>(x, 0, &emu::op_shuffle<T, emu::SH_FIRST, 32>, "simd_broadcast_first", loc);
}

struct simd_vote {
  typedef uint64_t vote_t;
  vote_t v_;
  constexpr explicit simd_vote(vote_t v = 0) : v_(v) {}
  constexpr explicit operator vote_t() const { return v_; }
  constexpr bool all() const { return v_ == 0xffffffffull; }
  constexpr bool any() const { return v_ != 0; }
};
inline bool simd_all(bool b, SL loc = SL::current()) {
  return emu::collective<bool>(b, 0, &emu::op_vote_all, "simd_all", loc);
}
inline bool simd_any(bool b, SL loc = SL::current()) {
  return emu::collective<bool>(b, 0, &emu::op_vote_any, "simd_any", loc);
}
inline simd_vote simd_ballot(bool b, SL loc = SL::current()) {
  return simd_vote(emu::collective<uint64_t>(b, 0, &emu::op_ballot, "simd_ballot", loc));
}
inline simd_vote simd_active_threads_mask(SL loc = SL::current()) {
  return simd_vote(emu::collective<uint64_t>(true, 0, &emu::op_ballot, "simd_active_threads_mask", loc));
}
inline bool simd_is_first(SL loc = SL::current()) {
  return emu::collective<bool>(true, 0, &emu::op_is_first, "simd_is_first", loc);
}

// Atomics on device / threadgroup memory: atomic<T> has the layout of T.
enum memory_order {
  memory_order_relaxed,
  memory_order_acquire,
  memory_order_release,
  memory_order_acq_rel,
  memory_order_seq_cst
};
template <class T> struct atomic {
  T v_;
  using value_type = T;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<ulong> atomic_ulong;
typedef atomic<long> atomic_long;

template <class A> using atomic_value_t = typename std::remove_cv_t<A>::value_type;
template <class A> inline atomic_value_t<A>* atomic_ptr(A* o) {
  return const_cast<atomic_value_t<A>*>(&o->v_);
}

template <class A, class U> inline void atomic_store_explicit(A* o, U v, memory_order = memory_order_relaxed) {
  atomic_value_t<A> x = atomic_value_t<A>(v);
  __atomic_store(atomic_ptr(o), &x, __ATOMIC_SEQ_CST);
}
template <class A> inline atomic_value_t<A> atomic_load_explicit(A* o, memory_order = memory_order_relaxed) {
  atomic_value_t<A> x;
  __atomic_load(atomic_ptr(o), &x, __ATOMIC_SEQ_CST);
  return x;
}
template <class A, class U>
inline atomic_value_t<A> atomic_exchange_explicit(A* o, U v, memory_order = memory_order_relaxed) {
  atomic_value_t<A> x = atomic_value_t<A>(v), old;
  __atomic_exchange(atomic_ptr(o), &x, &old, __ATOMIC_SEQ_CST);
  return old;
}
template <class A, class U>
inline bool atomic_compare_exchange_weak_explicit(A* o, atomic_value_t<A>* expected, U desired,
                                                  memory_order = memory_order_relaxed,
                                                  memory_order = memory_order_relaxed) {
  atomic_value_t<A> d = atomic_value_t<A>(desired);
  return __atomic_compare_exchange(atomic_ptr(o), expected, &d, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
template <class A, class U>
inline bool atomic_compare_exchange_strong_explicit(A* o, atomic_value_t<A>* expected, U desired,
                                                    memory_order = memory_order_relaxed,
                                                    memory_order = memory_order_relaxed) {
  return atomic_compare_exchange_weak_explicit(o, expected, desired);
}
template <class T, class F> inline T atomic_rmw(T* p, F f) {
  T old;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  T nv;
  do {
    nv = f(old);
  } while (!__atomic_compare_exchange(p, &old, &nv, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
#define EMU_ATOMIC_RMW(fname, expr)                                                                         \
  template <class A, class U>                                                                              \
  inline atomic_value_t<A> fname(A* o, U v_, memory_order = memory_order_relaxed) {                        \
    using T = atomic_value_t<A>;                                                                           \
    T v = T(v_);                                                                                           \
    return atomic_rmw(atomic_ptr(o), [v](T a) { return T(expr); });                                       \
  }
EMU_ATOMIC_RMW(atomic_fetch_add_explicit, a + v)
EMU_ATOMIC_RMW(atomic_fetch_sub_explicit, a - v)
EMU_ATOMIC_RMW(atomic_fetch_max_explicit, metal::max(a, v))
EMU_ATOMIC_RMW(atomic_fetch_min_explicit, metal::min(a, v))
EMU_ATOMIC_RMW(atomic_fetch_and_explicit, a & v)
EMU_ATOMIC_RMW(atomic_fetch_or_explicit, a | v)
EMU_ATOMIC_RMW(atomic_fetch_xor_explicit, a ^ v)
#undef EMU_ATOMIC_RMW
inline void atomic_thread_fence(mem_flags, memory_order, thread_scope = thread_scope_device) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

}  // namespace metal

using namespace metal;

///////////////////////////////////////////////////////////////////////////////////////////////////////////////////
// The part of MLX's utils.h (prepended by MLX to every custom kernel) that kernels use
///////////////////////////////////////////////////////////////////////////////////////////////////////////////////

inline uint16_t bfloat16_to_uint16(const bfloat16_t x) { return as_type<uint16_t>(x); }
inline bfloat16_t uint16_to_bfloat16(const uint16_t x) { return as_type<bfloat16_t>(x); }

template <typename U> struct WorkPerThread {
  static_assert(sizeof(U) <= 8, "Type too large");
  static constexpr int n = 8 / sizeof(U);
};

template <typename U> struct Limits;
#define EMU_INT_LIMIT(type)                                                   \
  template <> struct Limits<type> {                                           \
    static constexpr type max = metal::numeric_limits<type>::max();           \
    static constexpr type min = metal::numeric_limits<type>::min();           \
    static constexpr type finite_max = metal::numeric_limits<type>::max();    \
    static constexpr type finite_min = metal::numeric_limits<type>::min();    \
  };
EMU_INT_LIMIT(uint8_t)
EMU_INT_LIMIT(uint16_t)
EMU_INT_LIMIT(uint32_t)
EMU_INT_LIMIT(uint64_t)
EMU_INT_LIMIT(int8_t)
EMU_INT_LIMIT(int16_t)
EMU_INT_LIMIT(int32_t)
EMU_INT_LIMIT(int64_t)
#undef EMU_INT_LIMIT
#define EMU_FLOAT_LIMIT(type)                                                 \
  template <> struct Limits<type> {                                           \
    static constexpr type max = metal::numeric_limits<type>::infinity();      \
    static constexpr type min = -metal::numeric_limits<type>::infinity();     \
    static constexpr type finite_max = metal::numeric_limits<type>::max();    \
    static constexpr type finite_min = -metal::numeric_limits<type>::max();   \
  };
EMU_FLOAT_LIMIT(half)
EMU_FLOAT_LIMIT(float)
EMU_FLOAT_LIMIT(bfloat16_t)
#undef EMU_FLOAT_LIMIT
template <> struct Limits<bool> {
  static constexpr bool max = true;
  static constexpr bool min = false;
};

template <typename IdxT = int64_t>
inline IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <typename IdxT = int64_t>
inline IdxT elem_to_loc(uint3 elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = elem.x * IdxT(strides[ndim - 1]) + elem.y * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}
template <typename IdxT = int64_t> inline IdxT elem_to_loc_1(uint elem, const int64_t& stride) {
  return elem * IdxT(stride);
}
template <typename IdxT = int64_t> inline IdxT elem_to_loc_2(uint2 elem, const int64_t strides[2]) {
  return elem.x * IdxT(strides[1]) + elem.y * IdxT(strides[0]);
}
template <typename IdxT = int64_t> inline IdxT elem_to_loc_3(uint3 elem, const int64_t strides[3]) {
  return elem.x * IdxT(strides[2]) + elem.y * IdxT(strides[1]) + elem.z * IdxT(strides[0]);
}

template <typename T, typename U> inline T ceildiv(T N, U M) { return (N + M - 1) / M; }

template <bool condition, typename T, typename U> struct ConditionalType { using type = U; };
template <typename T, typename U> struct ConditionalType<true, T, U> { using type = T; };

template <typename U, typename T> inline U cast_to(T val) { return static_cast<U>(val); }
template <> inline bool cast_to<bool, float>(float val) { return (as_type<uint32_t>(val) & 0x7FFFFFFF) != 0; }
template <> inline bool cast_to<bool, bfloat16_t>(bfloat16_t val) {
  return (as_type<uint16_t>(val) & 0x7FFF) != 0;
}

///////////////////////////////////////////////////////////////////////////////////////////////////////////////////
// The scheduler
///////////////////////////////////////////////////////////////////////////////////////////////////////////////////

namespace emu {

struct Buf {
  char* p;
  size_t n;
  size_t cap;
  void add(const char* s) {
    size_t k = std::strlen(s);
    if (n + k + 1 > cap) k = cap > n + 1 ? cap - n - 1 : 0;
    std::memcpy(p + n, s, k);
    n += k;
    p[n] = 0;
  }
};

inline void fail(Launch* L, const char* msg) {
  int expected = 0;
  if (__atomic_compare_exchange_n(&L->failed, &expected, 1, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    std::snprintf(L->err, L->errlen, "%s", msg);
  }
}

inline void describe_site(const Fiber& f, char* out, size_t n) {
  std::snprintf(out, n, "%s (%s:%u:%u)", f.opname ? f.opname : "?", f.file ? f.file : "?", f.line, f.col);
}

inline bool same_site(const Fiber& a, const Fiber& b) {
  return a.state == b.state && a.op == b.op && a.line == b.line && a.col == b.col;
}

// "lanes 0-15 wait at simd_sum (k.metal:3:9); lanes 16-31 wait at ...": lines of the generated kernel text.
inline void describe_groups(Fiber* fs, int lo, int hi, const char* what, Buf& b) {
  bool used[1024] = {};
  bool first_group = true;
  for (int i = lo; i < hi; ++i) {
    if (used[i - lo] || fs[i].state == DONE || fs[i].state == RUNNABLE) continue;
    if (!first_group) b.add("; ");
    first_group = false;
    b.add(what);
    b.add(" ");
    int start = -1, prev = -2;
    bool first_run = true;
    char tmp[64];
    auto flush = [&]() {
      if (start < 0) return;
      if (!first_run) b.add(",");
      first_run = false;
      if (prev == start) std::snprintf(tmp, sizeof tmp, "%d", start - lo);
      else std::snprintf(tmp, sizeof tmp, "%d-%d", start - lo, prev - lo);
      b.add(tmp);
    };
    for (int j = i; j < hi; ++j) {
      if (used[j - lo] || fs[j].state == DONE || fs[j].state == RUNNABLE || !same_site(fs[i], fs[j])) continue;
      used[j - lo] = true;
      if (j == prev + 1) {
        prev = j;
      } else {
        flush();
        start = prev = j;
      }
    }
    flush();
    char site[256];
    describe_site(fs[i], site, sizeof site);
    b.add(" wait at ");
    b.add(site);
  }
}

inline bool run_threadgroup(Worker* w, Fiber* fs, char* stacks, size_t stride, const uint32_t bpos[3]) {
  Launch* L = w->L;
  uint32_t a[3], d[3];
  for (int k = 0; k < 3; ++k) {
    d[k] = L->tg[k];
    uint32_t start = bpos[k] * L->tg[k];
    a[k] = L->grid[k] - start < L->tg[k] ? L->grid[k] - start : L->tg[k];
  }
  const int n = int(a[0] * a[1] * a[2]);
  const uint32_t dn = d[0] * d[1] * d[2];
  ++w->gen;
  for (int k = 0; k < 3; ++k) w->bpos[k] = bpos[k];
  for (int t = 0; t < n; ++t) {
    Fiber& f = fs[t];
    f.state = RUNNABLE;
    f.tid = uint32_t(t);
    f.lane = uint32_t(t % kSimd);
    f.opname = nullptr;
    Attrs& at = f.attrs;
    uint32_t lx = t % a[0], ly = (t / a[0]) % a[1], lz = t / (a[0] * a[1]);
    at.thread_position_in_threadgroup = uint3(lx, ly, lz);
    at.threads_per_threadgroup = uint3(a[0], a[1], a[2]);
    at.dispatch_threads_per_threadgroup = uint3(d[0], d[1], d[2]);
    at.threadgroup_position_in_grid = uint3(bpos[0], bpos[1], bpos[2]);
    at.threadgroups_per_grid = uint3(L->ntg[0], L->ntg[1], L->ntg[2]);
    at.threads_per_grid = uint3(L->grid[0], L->grid[1], L->grid[2]);
    at.grid_size = at.threads_per_grid;
    at.grid_origin = uint3(0u);
    at.thread_position_in_grid = uint3(bpos[0] * d[0] + lx, bpos[1] * d[1] + ly, bpos[2] * d[2] + lz);
    at.thread_index_in_threadgroup = uint32_t(t);
    at.thread_index_in_simdgroup = uint32_t(t % kSimd);
    at.simdgroup_index_in_threadgroup = uint32_t(t / kSimd);
    at.threads_per_simdgroup = kSimd;
    at.thread_execution_width = kSimd;
    at.simdgroups_per_threadgroup = uint32_t((n + kSimd - 1) / kSimd);
    at.dispatch_simdgroups_per_threadgroup = (dn + kSimd - 1) / kSimd;
    at.quadgroup_index_in_threadgroup = uint32_t(t / 4);
    at.thread_index_in_quadgroup = uint32_t(t % 4);
    at.quadgroups_per_threadgroup = uint32_t((n + 3) / 4);
    at.dispatch_quadgroups_per_threadgroup = (dn + 3) / 4;
    init_stack(&f, stacks + size_t(t) * stride, L->stack_size);
  }
  int live = n;
  char msg[2048];
  for (;;) {
    for (int t = 0; t < n; ++t) {
      if (fs[t].state != RUNNABLE) continue;
      resume(w, &fs[t]);
      if (fs[t].state == DONE) --live;
    }
    if (live == 0) return true;
    bool released = false;
    for (int s = 0; s < n; s += kSimd) {
      int e = s + kSimd < n ? s + kSimd : n;
      int first = -1, nsimd = 0, nbar = 0;
      bool mismatch = false;
      for (int t = s; t < e; ++t) {
        if (fs[t].state == AT_SIMD) {
          ++nsimd;
          if (first < 0) first = t;
          else if (!same_site(fs[first], fs[t])) mismatch = true;
        } else if (fs[t].state == AT_BARRIER) {
          ++nbar;
        }
      }
      if (nsimd == 0) continue;
      if (mismatch || nbar > 0) {
        Buf b{msg, 0, sizeof msg};
        msg[0] = 0;
        char head[160];
        std::snprintf(head, sizeof head, "divergent SIMD collective in threadgroup (%u,%u,%u), simdgroup %d: ", bpos[0],
                      bpos[1], bpos[2], s / kSimd);
        b.add(head);
        describe_groups(fs, s, e, "lanes", b);
        b.add(" (the live lanes of a SIMD-group must reach the same collective together)");
        fail(L, msg);
        return false;
      }
      Fiber* lanes[kSimd] = {};
      for (int t = s; t < e; ++t)
        if (fs[t].state == AT_SIMD) lanes[t - s] = &fs[t];
      fs[first].op(lanes);
      for (int t = s; t < e; ++t)
        if (fs[t].state == AT_SIMD) fs[t].state = RUNNABLE;
      released = true;
    }
    if (released) continue;
    // Every live thread now waits at a threadgroup_barrier.
    int first = -1;
    bool mismatch = false;
    for (int t = 0; t < n; ++t) {
      if (fs[t].state != AT_BARRIER) continue;
      if (first < 0) first = t;
      else if (!same_site(fs[first], fs[t])) mismatch = true;
    }
    if (first < 0) {
      fail(L, "internal error: no runnable thread");
      return false;
    }
    if (mismatch) {
      Buf b{msg, 0, sizeof msg};
      msg[0] = 0;
      char head[160];
      std::snprintf(head, sizeof head,
                    "barrier not reached by all threads of threadgroup (%u,%u,%u) at the same site: ", bpos[0],
                    bpos[1], bpos[2]);
      b.add(head);
      describe_groups(fs, 0, n, "threads", b);
      fail(L, msg);
      return false;
    }
    for (int t = 0; t < n; ++t)
      if (fs[t].state == AT_BARRIER) fs[t].state = RUNNABLE;
  }
}

// Memory faults (SIGSEGV, SIGBUS) in a worker become a KernelRuntimeError instead of killing the process: the handler
// jumps back to the worker's scheduler loop; the threadgroup's fibers are abandoned. A fault elsewhere goes to the
// handler that was installed before.
inline struct sigaction g_old_segv, g_old_bus;
inline pthread_mutex_t g_sig_mu = PTHREAD_MUTEX_INITIALIZER;
inline int g_sig_users = 0;

static void fault_handler(int sig, siginfo_t* si, void*) {
  Worker* w = t_worker;
  if (w && w->catching) {
    w->catching = 0;
    w->fault_sig = sig;
    w->fault_addr = si->si_addr;
    siglongjmp(w->jb, 1);
  }
  sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);  // not ours: fault again, to the old one
}

inline void catch_faults(bool on) {
  pthread_mutex_lock(&g_sig_mu);
  if (on && g_sig_users++ == 0) {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  } else if (!on && --g_sig_users == 0) {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
  }
  pthread_mutex_unlock(&g_sig_mu);
}

inline void* worker_main(void* arg) {
  Launch* L = static_cast<Launch*>(arg);
  Worker w{};
  w.L = L;
  Worker* saved = t_worker;
  t_worker = &w;
  const size_t n = size_t(L->tg[0]) * L->tg[1] * L->tg[2];
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t ssz = (L->stack_size + page - 1) / page * page;
  const size_t stride = ssz + page;  // one guard page below each stack
  const size_t alt_size = 64 * 1024;
  char* region = static_cast<char*>(
      mmap(nullptr, n * stride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  char* alt = static_cast<char*>(mmap(nullptr, alt_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  Fiber* fs = static_cast<Fiber*>(std::calloc(n, sizeof(Fiber)));
  stack_t old_alt;
  bool alt_set = false;
  if (region == MAP_FAILED || alt == MAP_FAILED || fs == nullptr) {
    fail(L, "cannot allocate fiber stacks");
  } else {
    stack_t ss;
    ss.ss_sp = alt;
    ss.ss_size = alt_size;
    ss.ss_flags = 0;
    alt_set = sigaltstack(&ss, &old_alt) == 0;
    for (size_t i = 0; i < n; ++i) mprotect(region + i * stride, page, PROT_NONE);
    if (sigsetjmp(w.jb, 1) != 0) {
      char msg[512];
      uintptr_t a = uintptr_t(w.fault_addr), r = uintptr_t(region);
      bool guard = a >= r && a < r + n * stride && (a - r) % stride < page;
      std::snprintf(msg, sizeof msg,
                    "memory fault (%s at address %p) in threadgroup (%u,%u,%u), thread %u: %s", 
                    w.fault_sig == SIGBUS ? "SIGBUS" : "SIGSEGV", w.fault_addr, w.bpos[0], w.bpos[1], w.bpos[2],
                    w.cur ? w.cur->tid : 0u,
                    guard ? "a fiber stack overflow (raise MLX_QWEN36_EMULATOR_STACK_KIB)"
                          : "an out-of-bounds access?");
      fail(L, msg);
    } else {
      w.catching = 1;
      for (;;) {
        if (__atomic_load_n(&L->failed, __ATOMIC_SEQ_CST)) break;
        uint64_t idx = __atomic_fetch_add(&L->next, 1, __ATOMIC_SEQ_CST);
        if (idx >= L->total_tgs) break;
        uint32_t b[3] = {uint32_t(idx % L->ntg[0]), uint32_t((idx / L->ntg[0]) % L->ntg[1]),
                         uint32_t(idx / (uint64_t(L->ntg[0]) * L->ntg[1]))};
        if (!run_threadgroup(&w, fs, region + page, stride, b)) break;
      }
    }
    w.catching = 0;
  }
  if (alt_set) sigaltstack(&old_alt, nullptr);
  if (region != MAP_FAILED) munmap(region, n * stride);
  if (alt != MAP_FAILED) munmap(alt, alt_size);
  std::free(fs);
  t_worker = saved;
  return nullptr;
}

// dims: grid[3] (total threads), threadgroup[3] (already clamped to the grid).
inline int run_grid(Entry entry, void* const* bufs, const uint32_t* dims, int nworkers, size_t stack_size,
                    char* err, size_t errlen) {
  Launch L{};
  L.entry = entry;
  L.bufs = bufs;
  L.total_tgs = 1;
  for (int k = 0; k < 3; ++k) {
    L.grid[k] = dims[k];
    L.tg[k] = dims[3 + k];
    if (L.grid[k] == 0 || L.tg[k] == 0) return 0;
    L.ntg[k] = (L.grid[k] + L.tg[k] - 1) / L.tg[k];
    L.total_tgs *= L.ntg[k];
  }
  L.stack_size = stack_size;
  L.err = err;
  L.errlen = errlen;
  if (err && errlen) err[0] = 0;
  catch_faults(true);
  if (uint64_t(nworkers) > L.total_tgs) nworkers = int(L.total_tgs);
  if (nworkers < 1) nworkers = 1;
  pthread_t th[64];
  int started = 0;
  for (int k = 1; k < nworkers && k < 64; ++k) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 20);
    if (pthread_create(&th[started], &attr, worker_main, &L) == 0) ++started;
    pthread_attr_destroy(&attr);
  }
  worker_main(&L);
  for (int k = 0; k < started; ++k) pthread_join(th[k], nullptr);
  catch_faults(false);
  return L.failed ? 1 : 0;
}

}  // namespace emu

// Address spaces and function qualifiers vanish. Defined last, so that the code above is not affected.
#define device
#define constant
#define thread
#define kernel
#define METAL_FUNC inline
#define MLX_MTL_PRAGMA_UNROLL
#define MLX_MTL_CONST
