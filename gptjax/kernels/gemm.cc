// gptjax's CPU matmul: an XLA FFI handler that runs C[b] = op(A[b]) @ op(B[b]) through oneMKL, split over
// XLA's own intra-op thread pool (one pool: MKL is linked sequential, so it starts no threads of its own).
//
// Inputs float32 or bfloat16 (both the same), output float32 (bfloat16 inputs use cblas_gemm_bf16bf16f32, which
// runs on AMX or AVX-512 BF16 where the CPU has them). A: [batch..., M, K] ([batch..., K, M] with trans_a),
// B: [batch..., K, N] ([batch..., N, K] with trans_b) or without batch dims (shared by every batch), C: [batch...,
// M, N]. Built by gptjax/kernels/__init__.py; the prototypes below are MKL's LP64 CBLAS.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" {
void cblas_sgemm(int layout, int ta, int tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
void cblas_gemm_bf16bf16f32(int layout, int ta, int tb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

struct Gemm {
  bool bf16, ta, tb;
  int64_t m, n, k, a_stride, b_stride;  // element strides between batch entries (b_stride 0: B is shared)
  const void* a;
  const void* b;
  float* c;

  // C[batch][rows or cols lo..hi): split along M when split_m, else along N.
  void run(int64_t batch, bool split_m, int64_t lo, int64_t hi) const {
    const int lda = ta ? m : k, ldb = tb ? k : n;
    int64_t a_off = batch * a_stride, b_off = batch * b_stride, c_off = batch * m * n;
    int64_t mm = m, nn = n;
    if (split_m) {
      a_off += ta ? lo : lo * k;
      c_off += lo * n;
      mm = hi - lo;
    } else {
      b_off += tb ? lo * k : lo;
      c_off += lo;
      nn = hi - lo;
    }
    if (mm == 0 || nn == 0) return;
    if (bf16) {
      cblas_gemm_bf16bf16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, mm, nn, k, 1.0f,
                             static_cast<const uint16_t*>(a) + a_off, lda, static_cast<const uint16_t*>(b) + b_off,
                             ldb, 0.0f, c + c_off, n);
    } else {
      cblas_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, mm, nn, k, 1.0f,
                  static_cast<const float*>(a) + a_off, lda, static_cast<const float*>(b) + b_off, ldb, 0.0f,
                  c + c_off, n);
    }
  }
};

// Work shared by the calling thread and the pool's helpers. Whoever takes a piece runs it; the caller waits only
// for pieces already taken, so it never waits on a helper that no free thread will ever run (two devices' steps
// can fill the pool at once).
struct Pieces {
  Gemm g;
  int64_t batch, parts, span;
  bool split_m;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;

  bool take_one() {
    int64_t i = next.fetch_add(1);
    if (i >= batch * parts) return false;
    int64_t extent = split_m ? g.m : g.n, p = i % parts;
    g.run(i / parts, split_m, std::min(extent, p * span), std::min(extent, (p + 1) * span));
    if (done.fetch_add(1) + 1 == batch * parts) {
      std::lock_guard<std::mutex> lock(mu);
      cv.notify_all();
    }
    return true;
  }
};

ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> c,
                    bool trans_a, bool trans_b) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() < 2 || bd.size() < 2) return ffi::Error::InvalidArgument("gemm: operands need two dimensions");
  if (a.element_type() != b.element_type() || c->element_type() != ffi::DataType::F32 ||
      (a.element_type() != ffi::DataType::F32 && a.element_type() != ffi::DataType::BF16))
    return ffi::Error::InvalidArgument("gemm: float32 or bfloat16 operands (the same), float32 result");
  int64_t ra = ad.size(), rb = bd.size();
  int64_t m = trans_a ? ad[ra - 1] : ad[ra - 2], k = trans_a ? ad[ra - 2] : ad[ra - 1];
  int64_t kb = trans_b ? bd[rb - 1] : bd[rb - 2], n = trans_b ? bd[rb - 2] : bd[rb - 1];
  int64_t batch = 1;
  for (int64_t i = 0; i < ra - 2; ++i) batch *= ad[i];
  // B: a matrix shared by every batch entry, or A's batch dims exactly
  bool shared = rb == 2;
  if (!shared && rb != ra) return ffi::Error::InvalidArgument("gemm: B's batch dims are not A's");
  for (int64_t i = 0; !shared && i < ra - 2; ++i)
    if (ad[i] != bd[i]) return ffi::Error::InvalidArgument("gemm: B's batch dims are not A's");
  if (k != kb || cd[cd.size() - 2] != m || cd[cd.size() - 1] != n)
    return ffi::Error::InvalidArgument("gemm: operand shapes do not match");
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  float* out = static_cast<float*>(c->untyped_data());
  if (k == 0) {
    std::fill(out, out + batch * m * n, 0.0f);
    return ffi::Error::Success();
  }

  auto work = std::make_shared<Pieces>();
  work->g = Gemm{a.element_type() == ffi::DataType::BF16, trans_a, trans_b, m, n, k, m * k,
                 shared ? 0 : k * n, a.untyped_data(), b.untyped_data(), out};
  // Pieces of at least ~4 MFLOP (smaller ones cost more to hand over than they save), at most one per thread
  // per batch entry when the batch alone does not fill the pool.
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t flops = 2 * m * n * k;
  work->split_m = m >= n;
  int64_t extent = work->split_m ? m : n;
  int64_t parts = batch >= threads ? 1 : std::min<int64_t>({(threads + batch - 1) / batch, extent,
                                                             std::max<int64_t>(1, flops / (4 << 20))});
  work->batch = batch;
  work->parts = parts;
  work->span = (extent + parts - 1) / parts;
  int64_t total = batch * parts;
  for (int64_t h = 1; h < std::min(threads, total); ++h) {
    pool.Schedule([work] { while (work->take_one()) {} });
  }
  while (work->take_one()) {}
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == total; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxGemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
