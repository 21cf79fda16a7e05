// 2-D convolutions and training-mode batch normalisation for XLA:CPU through oneDNN, as XLA FFI handlers
// (see cifar_jax/onednn_conv.py). The batch normalisation handlers are at the end of the file.
//
// Layouts are the trainer's: activations NHWC, kernels HWIO, all three operands float32 or all three
// bfloat16 (oneDNN accumulates bfloat16 in float32 and rounds the result once). Three handlers cover a
// training step: forward, the gradient with respect to the input (backward data) and the gradient with
// respect to the kernel (backward weights). oneDNN's NHWC kernels read and write the activations where
// they lie, so none of the transposes XLA's own convolutions need around the weight gradient happen here;
// kernels are reordered to whatever blocked layout oneDNN picks (they are small). Primitives are built
// once per shape and cached.
//
// A grouped convolution (`groups` > 1; depthwise when groups = channels, as in EfficientNet) takes JAX's
// HWIO kernel (kh, kw, C / groups, O), whose output channels are group-major: that is oneDNN's `hwigo`
// layout of the 5-D (groups, O / groups, C / groups, kh, kw) weights. For groups = channels oneDNN picks
// its depthwise kernels (jit_uni_dw_convolution_*, jit_avx512_common_dw_convolution_*).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <omp.h>
#include <pthread.h>
#include <unistd.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::algorithm;
using dnnl::convolution_backward_data;
using dnnl::convolution_backward_weights;
using dnnl::convolution_forward;
using dnnl::engine;
using dnnl::memory;
using dnnl::prop_kind;
using dnnl::reorder;
using dnnl::stream;
using tag = memory::format_tag;
using dt = memory::data_type;

engine& CpuEngine() {
  static engine* eng = new engine(engine::kind::cpu, 0);
  return *eng;
}

// One convolution's geometry, from the NHWC input, the HWIO kernel and the attributes.
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;
  int64_t groups = 1;
  dt type = dt::f32;  // every operand's: f32 or bf16

  memory::desc Src(tag t = tag::nhwc) const { return memory::desc({n, c, h, w}, type, t); }
  memory::desc Dst(tag t = tag::nhwc) const { return memory::desc({n, o, oh, ow}, type, t); }
  // The weights in `t`, or in the user's HWIO layout (`Hwio`).
  memory::desc Weights(tag t, dt type_override = dt::undef) const {
    dt wt = type_override == dt::undef ? type : type_override;
    if (groups == 1) return memory::desc({o, c, kh, kw}, wt, t);
    return memory::desc({groups, o / groups, c / groups, kh, kw}, wt, t);
  }
  memory::desc Hwio() const { return Weights(groups == 1 ? tag::hwio : tag::hwigo); }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb, pr}; }
  int64_t SrcSize() const { return n * h * w * c; }
  int64_t DstSize() const { return n * oh * ow * o; }
  int64_t WeightsSize() const { return kh * kw * (c / groups) * o; }

  std::string Key(const char* kind, int threads) const {
    std::string key(kind);
    key += type == dt::bf16 ? ",bf16" : ",f32";
    for (int64_t v : {n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, groups}) {
      key += ',' + std::to_string(v);
    }
    return key + ",threads=" + std::to_string(threads);
  }
};

// A call's operands may carry leading batch dimensions (vmap over seeds or samples: the
// 'expand_dims' rule, which gives an unbatched operand size-1 dimensions there). The output has them
// all; an input's leading dimension is either the output's or 1 (the same tensor for every batch
// element). `Batch` maps a batch element to each operand's offset.
struct Batch {
  std::vector<int64_t> dims;  // the output's leading dimensions
  int64_t count = 1;

  // The offset (in elements) of batch element `b` in an operand with leading dimensions `lead`.
  int64_t Offset(int64_t b, ffi::Span<const int64_t> lead, int64_t inner) const {
    int64_t offset = 0, stride = inner;
    for (int64_t i = static_cast<int64_t>(dims.size()) - 1; i >= 0; --i) {
      int64_t index = b % dims[i];
      b /= dims[i];
      if (lead[i] != 1) offset += index * stride;
      stride *= lead[i];
    }
    return offset;
  }
};

ffi::Span<const int64_t> Leading(ffi::Span<const int64_t> dims) {
  return ffi::Span<const int64_t>(dims.begin(), dims.size() - 4);
}
ffi::Span<const int64_t> Trailing(ffi::Span<const int64_t> dims) {
  return ffi::Span<const int64_t>(dims.end() - 4, 4);
}

// `in`, `kernel` and `out` are the NHWC input, HWIO kernel and NHWC output of the convolution (of the
// forward one, for the backward handlers), each with the same number of leading batch dimensions;
// `result` is the one among them the handler writes (all its leading dimensions are the batch's).
ffi::Error MakeGeometry(ffi::Span<const int64_t> in, ffi::Span<const int64_t> kernel,
                        ffi::Span<const int64_t> out, ffi::Span<const int64_t> result, int64_t sh,
                        int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t groups,
                        Geometry* g, Batch* batch) {
  if (in.size() < 4 || kernel.size() != in.size() || out.size() != in.size()) {
    return ffi::Error::InvalidArgument(
        "onednn_conv: expected NHWC activations and an HWIO kernel, with the same leading dimensions");
  }
  batch->dims.assign(result.begin(), result.end() - 4);
  batch->count = 1;
  for (size_t i = 0; i < batch->dims.size(); ++i) {
    batch->count *= batch->dims[i];
    for (auto operand : {in, kernel, out}) {
      if (operand[i] != 1 && operand[i] != batch->dims[i]) {
        return ffi::Error::InvalidArgument("onednn_conv: leading dimensions do not broadcast");
      }
    }
  }
  in = Trailing(in);
  kernel = Trailing(kernel);
  out = Trailing(out);
  *g = Geometry{in[0],  in[1],  in[2],  in[3], kernel[0], kernel[1], kernel[3], out[1],
                out[2], sh,     sw,     pt,    pb,        pl,        pr,        groups};
  if (groups < 1 || in[3] % groups || kernel[3] % groups || kernel[2] * groups != in[3] ||
      out[0] != in[0] || out[3] != kernel[3] ||
      g->oh != (g->h + pt + pb - g->kh) / sh + 1 || g->ow != (g->w + pl + pr - g->kw) / sw + 1) {
    return ffi::Error::InvalidArgument("onednn_conv: inconsistent shapes");
  }
  return ffi::Error::Success();
}

// A cached primitive with the kernel layout it wants and the reorder to or from HWIO when that
// differs. Primitives use a scratchpad the caller provides, so one primitive can run in several
// threads at once (each with its own scratchpad and blocked-kernel buffer).
struct Entry {
  dnnl::primitive conv;
  memory::desc weights;  // the layout the primitive reads or writes its kernel in
  memory::desc scratchpad;
  bool reorder_weights = false;
  reorder weights_reorder;  // HWIO -> `weights` (forward, backward data), or back (weights)
  std::string impl;  // oneDNN's name of the implementation it picked (jit_dw:avx512_core, ...)
  // A bfloat16 grouped convolution for which oneDNN picked no depthwise kernel: it runs as float32
  // (`Widened`) instead. oneDNN 3.2's bfloat16 picks there (a generic grouped kernel for 5x5 kernel
  // gradients, AMX's strided brgconv for stride-2 data gradients) are 2-4x slower than its float32
  // depthwise ones (BENCHMARKS.md, "Depthwise convolutions").
  bool widen = false;
};

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<Entry>>& Cache() {
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Entry>>();
  return *cache;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return convolution_forward::primitive_desc(
      CpuEngine(), prop_kind::forward_training, algorithm::convolution_direct, g.Src(),
      g.Weights(tag::any), g.Dst(), g.Strides(), g.PadL(), g.PadR(), UserScratchpad());
}

// The primitive for `kind` and `g`, built for the calling thread's OpenMP thread count (oneDNN splits
// its work for that many threads, so the count is part of the key).
std::shared_ptr<Entry> Build(const std::string& k, const Geometry& g);

std::shared_ptr<Entry> Lookup(const char* kind, const Geometry& g) {
  std::string key = g.Key(kind, omp_get_max_threads());
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = Cache().find(key);
  if (it != Cache().end()) return it->second;
  std::shared_ptr<Entry> entry = Build(kind, g);
  if (g.type == dt::bf16 && g.groups > 1 && entry->impl.find("dw") == std::string::npos) {
    entry = std::make_shared<Entry>();
    entry->widen = true;
  }
  Cache()[key] = entry;
  return entry;
}

// The primitive of `k` ("fwd", "bwd_data", "bwd_weights") for `g`, with its kernel reorder.
std::shared_ptr<Entry> Build(const std::string& k, const Geometry& g) {
  auto entry = std::make_shared<Entry>();
  memory::desc hwio = g.Hwio();
  if (k == "fwd") {
    auto pd = ForwardDesc(g);
    entry->conv = convolution_forward(pd);
    entry->impl = pd.impl_info_str();
    entry->weights = pd.weights_desc();
    entry->scratchpad = pd.scratchpad_desc();
  } else if (k == "bwd_data") {
    auto pd = convolution_backward_data::primitive_desc(
        CpuEngine(), algorithm::convolution_direct, g.Src(), g.Weights(tag::any), g.Dst(),
        g.Strides(), g.PadL(), g.PadR(), ForwardDesc(g), UserScratchpad());
    entry->conv = convolution_backward_data(pd);
    entry->impl = pd.impl_info_str();
    entry->weights = pd.weights_desc();
    entry->scratchpad = pd.scratchpad_desc();
  } else {
    // The kernel gradient accumulated and written in float32 (bfloat16 operands: oneDNN's
    // jit_bf16 kernel, AVX512-BF16), rounded once to the operands' type by the reorder back to HWIO.
    // (Until 2026-12-06 bfloat16 src and diff_dst were widened to float32 for oneDNN's float32 kernel,
    // after a measurement on a heavily loaded machine; on a quiet one the bfloat16 kernel is 1.8x
    // faster: BENCHMARKS.md, "Mixed precision".)
    memory::desc diff_weights = g.Weights(tag::any, dt::f32);
    auto pd = convolution_backward_weights::primitive_desc(
        CpuEngine(), algorithm::convolution_direct, g.Src(), diff_weights, g.Dst(), g.Strides(),
        g.PadL(), g.PadR(), ForwardDesc(g), UserScratchpad());
    entry->conv = convolution_backward_weights(pd);
    entry->impl = pd.impl_info_str();
    entry->weights = pd.diff_weights_desc();
    entry->scratchpad = pd.scratchpad_desc();
  }
  entry->reorder_weights = entry->weights != hwio;
  if (entry->reorder_weights) {
    entry->weights_reorder = k == "bwd_weights"
                                 ? reorder(reorder::primitive_desc(CpuEngine(), entry->weights,
                                                                   CpuEngine(), hwio))
                                 : reorder(reorder::primitive_desc(CpuEngine(), hwio, CpuEngine(),
                                                                   entry->weights));
  }
  return entry;
}

// A thread's own buffers (the blocked kernel, the scratchpad), grown as needed and kept between calls.
void* ThreadBuffer(int which, size_t bytes) {
  thread_local std::vector<char> buffers[5];
  std::vector<char>& buffer = buffers[which];
  if (buffer.size() < bytes + 64) buffer.resize(bytes + 64);
  // 64-byte aligned, as oneDNN prefers for its blocked layouts.
  return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
}

// Runs one convolution of `kind` with `act` (the NHWC tensor on the input side: src or diff_src) and
// `out_side` (the NHWC tensor on the output side: dst or diff_dst); `kernel` is the HWIO kernel (or diff
// kernel). Uses the calling thread's OpenMP thread count.
void Widened(const char* kind, const Geometry& g, void* act, void* out_side, void* kernel);

void RunOne(const char* kind, const Geometry& g, void* act, void* out_side, void* kernel) {
  std::shared_ptr<Entry> entry = Lookup(kind, g);
  if (entry->widen) return Widened(kind, g, act, out_side, kernel);
  engine& eng = CpuEngine();
  stream s(eng);
  memory act_mem(g.Src(), eng, act);
  memory out_mem(g.Dst(), eng, out_side);
  memory hwio_mem(g.Hwio(), eng, kernel);
  memory weights_mem = entry->reorder_weights
                           ? memory(entry->weights, eng,
                                    ThreadBuffer(0, entry->weights.get_size()))
                           : hwio_mem;
  memory scratch_mem(entry->scratchpad, eng, ThreadBuffer(1, entry->scratchpad.get_size()));
  std::string k(kind);
  if (k == "fwd") {
    if (entry->reorder_weights) entry->weights_reorder.execute(s, hwio_mem, weights_mem);
    entry->conv.execute(s, {{DNNL_ARG_SRC, act_mem},
                            {DNNL_ARG_WEIGHTS, weights_mem},
                            {DNNL_ARG_DST, out_mem},
                            {DNNL_ARG_SCRATCHPAD, scratch_mem}});
  } else if (k == "bwd_data") {
    if (entry->reorder_weights) entry->weights_reorder.execute(s, hwio_mem, weights_mem);
    entry->conv.execute(s, {{DNNL_ARG_DIFF_DST, out_mem},
                            {DNNL_ARG_WEIGHTS, weights_mem},
                            {DNNL_ARG_DIFF_SRC, act_mem},
                            {DNNL_ARG_SCRATCHPAD, scratch_mem}});
  } else {
    entry->conv.execute(s, {{DNNL_ARG_SRC, act_mem},
                            {DNNL_ARG_DIFF_DST, out_mem},
                            {DNNL_ARG_DIFF_WEIGHTS, weights_mem},
                            {DNNL_ARG_SCRATCHPAD, scratch_mem}});
    if (entry->reorder_weights) entry->weights_reorder.execute(s, weights_mem, hwio_mem);
  }
  s.wait();
}

// `count` elements from `from` (of type `a`) to `to` (of type `b`), rounding to nearest even into bfloat16.
void Convert(void* from, dt a, void* to, dt b, int64_t count, stream& s) {
  memory::desc da({count}, a, tag::a), db({count}, b, tag::a);
  memory ma(da, CpuEngine(), from), mb(db, CpuEngine(), to);
  reorder(reorder::primitive_desc(CpuEngine(), da, CpuEngine(), db)).execute(s, ma, mb);
  s.wait();
}

// A bfloat16 call run as float32 (`Entry::widen`): the inputs widened exactly into this thread's buffers,
// the float32 convolution, its result rounded once to bfloat16, as the bfloat16 primitive would.
void Widened(const char* kind, const Geometry& g, void* act, void* out_side, void* kernel) {
  Geometry g32 = g;
  g32.type = dt::f32;
  stream s(CpuEngine());
  void* act32 = ThreadBuffer(2, g.SrcSize() * 4);
  void* out32 = ThreadBuffer(3, g.DstSize() * 4);
  void* kernel32 = ThreadBuffer(4, g.WeightsSize() * 4);
  std::string k(kind);
  // Inputs: fwd reads src and weights; bwd_data diff_dst and weights; bwd_weights src and diff_dst.
  if (k != "bwd_data") Convert(act, dt::bf16, act32, dt::f32, g.SrcSize(), s);
  if (k != "fwd") Convert(out_side, dt::bf16, out32, dt::f32, g.DstSize(), s);
  if (k != "bwd_weights") Convert(kernel, dt::bf16, kernel32, dt::f32, g.WeightsSize(), s);
  RunOne(kind, g32, act32, out32, kernel32);
  if (k == "fwd") Convert(out32, dt::f32, out_side, dt::bf16, g.DstSize(), s);
  if (k == "bwd_data") Convert(act32, dt::f32, act, dt::bf16, g.SrcSize(), s);
  if (k == "bwd_weights") Convert(kernel32, dt::f32, kernel, dt::bf16, g.WeightsSize(), s);
}

// Every oneDNN call runs on one thread of this library's, whichever XLA:CPU thread asks for it.
//
// OpenMP keeps a team of threads per thread that starts a parallel region, and XLA:CPU runs a step's
// thunks on whichever of its threads is free: called from there, oneDNN's calls were spread over several
// teams, whose idle workers sleep at once when there are more of them than cores (libgomp's throttled
// spin), so each call began by waking its team (a step's weight reorders, often a call's first region,
// took 5 times as long as torch's) and idle teams' workers competed for the cores. One thread means one
// team, whose workers spin between the calls of a step (GOMP_SPINCOUNT, set when the library is loaded:
// onednn_conv.py). XLA:CPU may also run independent thunks at once (a layer's backward-data and
// backward-weights calls); each call already spreads over every core, so they take turns.
class OneThread {
 public:
  // Runs `job` on this thread and returns when it is done; callers take turns.
  void Run(const std::function<void()>& job) {
    std::lock_guard<std::mutex> turn(turn_);
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = &job;
    ++posted_;
    wake_.notify_one();
    finished_.wait(lock, [&] { return done_ == posted_; });
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return posted_ != done_; });
      lock.unlock();
      (*job_)();
      lock.lock();
      ++done_;
      finished_.notify_one();
    }
  }

  std::mutex turn_, mutex_;
  std::condition_variable wake_, finished_;
  const std::function<void()>* job_ = nullptr;
  uint64_t posted_ = 0, done_ = 0;
  // Last: it starts once the members above exist. Named, as its team's workers will be (they take the
  // name of the thread that starts them): `top -H` shows oneDNN's share of the cores.
  std::thread thread_{[this] {
    pthread_setname_np(pthread_self(), "onednn");
    Loop();
  }};
};

// Whether calls go to the library's thread (`OneThread`) or run on the thread that makes them, one at a
// time (`cifar_jax_onednn_set_one_thread`: onednn_conv.set_one_thread).
std::atomic<bool> one_thread{true};
std::mutex caller_mutex;

// Runs `job` on the library's oneDNN thread (a new one in a forked child, which has none of its parent's),
// or on this thread.
void Execute(const std::function<void()>& job) {
  if (!one_thread.load()) {
    std::lock_guard<std::mutex> lock(caller_mutex);
    return job();
  }
  static std::mutex mutex;
  static OneThread* thread = nullptr;  // never destroyed: it lives as long as the process
  static pid_t owner = 0;
  OneThread* current;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (thread == nullptr || owner != getpid()) {
      thread = new OneThread();
      owner = getpid();
    }
    current = thread;
  }
  current->Run(job);
}

// Runs `kind` for every element of `batch`; `act`, `out_side` and `kernel` are the operands' bases and
// `*_lead` their leading dimensions. One element: oneDNN spreads the convolution over every thread.
// Several (the seeds of a vmap-ed run): the elements are spread over the threads instead, each
// convolution on one thread, so that k small convolutions keep every core busy without splitting each
// one; a thread's elements run in order, and each element's result does not depend on the others'.
ffi::Error Run(const char* kind, const Geometry& g, const Batch& batch, void* act,
               ffi::Span<const int64_t> act_lead, void* out_side,
               ffi::Span<const int64_t> out_lead, void* kernel,
               ffi::Span<const int64_t> kernel_lead) {
  const int64_t bytes = g.type == dt::bf16 ? 2 : 4;
  auto at = [&](void* base, int64_t elements) { return static_cast<char*>(base) + elements * bytes; };
  auto element = [&](int64_t b) {
    RunOne(kind, g, at(act, batch.Offset(b, act_lead, g.SrcSize())),
           at(out_side, batch.Offset(b, out_lead, g.DstSize())),
           at(kernel, batch.Offset(b, kernel_lead, g.WeightsSize())));
  };
  std::string error;
  Execute([&] {
    int threads = static_cast<int>(std::min<int64_t>(batch.count, omp_get_max_threads()));
    if (threads <= 1) {
      try {
        for (int64_t b = 0; b < batch.count; ++b) element(b);
      } catch (const std::exception& e) {  // dnnl::error, bad_alloc: the call's error
        error = e.what();
      }
    } else {
      std::mutex error_mutex;
#pragma omp parallel num_threads(threads)
      {
        omp_set_num_threads(1);  // this thread's oneDNN calls run on it alone
        const int team = omp_get_num_threads();  // the runtime may give fewer threads than asked
        try {
          for (int64_t b = omp_get_thread_num(); b < batch.count; b += team) element(b);
        } catch (const std::exception& e) {  // dnnl::error, bad_alloc: none may leave an OpenMP region
          std::lock_guard<std::mutex> error_lock(error_mutex);
          error = e.what();
        }
      }
    }
  });
  if (!error.empty()) {
    return ffi::Error::Internal(std::string("onednn_conv ") + kind + ": " + error);
  }
  return ffi::Error::Success();
}

// The operands' common type (f32 or bf16), or an error.
ffi::Error OperandType(ffi::DataType a, ffi::DataType b, ffi::DataType result, dt* type) {
  if (a != b || b != result) {
    return ffi::Error::InvalidArgument("onednn_conv: the operands and result must share one dtype");
  }
  if (a == ffi::DataType::F32) {
    *type = dt::f32;
  } else if (a == ffi::DataType::BF16) {
    *type = dt::bf16;
  } else {
    return ffi::Error::InvalidArgument("onednn_conv: only float32 and bfloat16 are supported");
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                       int64_t groups) {
  Geometry g;
  Batch batch;
  ffi::Error err = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), y->dimensions(), sh,
                                sw, pt, pb, pl, pr, groups, &g, &batch);
  if (err.failure()) return err;
  err = OperandType(x.element_type(), w.element_type(), y->element_type(), &g.type);
  if (err.failure()) return err;
  return Run("fwd", g, batch, x.untyped_data(), Leading(x.dimensions()), y->untyped_data(),
             Leading(y->dimensions()), w.untyped_data(), Leading(w.dimensions()));
}

ffi::Error BackwardDataImpl(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                            int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                       int64_t groups) {
  Geometry g;
  Batch batch;
  ffi::Error err = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), dx->dimensions(),
                                sh, sw, pt, pb, pl, pr, groups, &g, &batch);
  if (err.failure()) return err;
  err = OperandType(dy.element_type(), w.element_type(), dx->element_type(), &g.type);
  if (err.failure()) return err;
  return Run("bwd_data", g, batch, dx->untyped_data(), Leading(dx->dimensions()), dy.untyped_data(),
             Leading(dy.dimensions()), w.untyped_data(), Leading(w.dimensions()));
}

ffi::Error BackwardWeightsImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                               int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                               int64_t pr, int64_t groups) {
  Geometry g;
  Batch batch;
  ffi::Error err = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), dw->dimensions(),
                                sh, sw, pt, pb, pl, pr, groups, &g, &batch);
  if (err.failure()) return err;
  err = OperandType(x.element_type(), dy.element_type(), dw->element_type(), &g.type);
  if (err.failure()) return err;
  return Run("bwd_weights", g, batch, x.untyped_data(), Leading(x.dimensions()), dy.untyped_data(),
             Leading(dy.dimensions()), dw->untyped_data(), Leading(dw->dimensions()));
}


// ---------------------------------------------------------------------------------------------------
// Training-mode batch normalisation (oneDNN's batch_normalization primitives, `bnorm_jit`), NHWC.
//
// The activation is treated as (rows, C) in NHWC order, rows being every axis but the last; `rank` (an
// attribute) is the activation's rank without the leading vmap dimensions, which the handler loops over.
// Statistics, scale and shift are float32 (`C` or leading dimensions + `C`); the activation and its
// gradients are float32 or bfloat16, oneDNN accumulating a bfloat16 input in float32. The forward pass
// returns the output, the batch mean and the biased batch variance (oneDNN's two-pass variance, as
// torch's); the backward pass the input's gradient and the float32 gradients of scale and shift.

struct NormGeometry {
  int64_t n, rows, c;  // rows: n x the spatial size
  dt type = dt::f32;
  float epsilon;
  bool relu = false;  // a ReLU fused after the normalisation (oneDNN's fuse_norm_relu, with a workspace)
  // As (N, C, spatial, 1): oneDNN's kernel splits its work over N and is 1.5-2x slower on one long
  // (rows, C) than on the activation's own (N, C, H, W) (measured on ResNet18's shapes).
  memory::desc Data() const { return memory::desc({n, c, rows / n, 1}, type, tag::nhwc); }
  memory::desc Channels() const { return memory::desc({c}, dt::f32, tag::a); }
  std::string Key(const char* kind, int threads) const {
    return std::string(kind) + (type == dt::bf16 ? ",bf16," : ",f32,") + std::to_string(n) + ',' +
           std::to_string(rows) + ',' +
           std::to_string(c) + ',' + std::to_string(epsilon) + (relu ? ",relu" : "") +
           ",threads=" + std::to_string(threads);
  }
};

struct NormEntry {
  dnnl::primitive prim;
  memory::desc scratchpad;
  memory::desc workspace;  // the ReLU's mask (forward writes it, backward reads it); empty without
};

dnnl::batch_normalization_forward::primitive_desc NormForwardDesc(const NormGeometry& g) {
  auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  if (g.relu) flags = flags | dnnl::normalization_flags::fuse_norm_relu;
  return dnnl::batch_normalization_forward::primitive_desc(CpuEngine(), prop_kind::forward_training,
                                                           g.Data(), g.Data(), g.epsilon, flags,
                                                           UserScratchpad());
}

std::shared_ptr<NormEntry> NormLookup(const char* kind, const NormGeometry& g) {
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<NormEntry>>();
  std::string key = g.Key(kind, omp_get_max_threads());
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  auto entry = std::make_shared<NormEntry>();
  auto fwd = NormForwardDesc(g);
  const auto flags = fwd.get_flags();
  entry->workspace = fwd.workspace_desc();
  if (std::string(kind) == "bn_fwd") {
    entry->prim = dnnl::batch_normalization_forward(fwd);
    entry->scratchpad = fwd.scratchpad_desc();
  } else {
    dnnl::batch_normalization_backward::primitive_desc bwd(CpuEngine(), prop_kind::backward, g.Data(),
                                                           g.Data(), g.Data(), g.epsilon, flags, fwd,
                                                           UserScratchpad());
    entry->prim = dnnl::batch_normalization_backward(bwd);
    entry->scratchpad = bwd.scratchpad_desc();
  }
  (*cache)[key] = entry;
  return entry;
}

// The geometry of the activation `x` (leading vmap dimensions, then `rank` dimensions ending in C), and
// the number of vmap elements: those of the result the handler writes (`result_elements` in all).
ffi::Error MakeNormGeometry(ffi::AnyBuffer x, size_t result_elements, int64_t rank, float epsilon,
                            bool relu, NormGeometry* g, int64_t* count) {
  auto dims = x.dimensions();
  if (rank < 2 || static_cast<int64_t>(dims.size()) < rank) {
    return ffi::Error::InvalidArgument("onednn_batch_norm: expected an activation of rank >= 2");
  }
  if (x.element_type() == ffi::DataType::F32) {
    g->type = dt::f32;
  } else if (x.element_type() == ffi::DataType::BF16) {
    g->type = dt::bf16;
  } else {
    return ffi::Error::InvalidArgument("onednn_batch_norm: only float32 and bfloat16 are supported");
  }
  const int64_t lead = static_cast<int64_t>(dims.size()) - rank;
  g->n = dims[lead];
  g->rows = 1;
  for (int64_t i = lead; i < static_cast<int64_t>(dims.size()) - 1; ++i) g->rows *= dims[i];
  g->c = dims[dims.size() - 1];
  g->epsilon = epsilon;
  g->relu = relu;
  *count = static_cast<int64_t>(result_elements) / (g->rows * g->c);
  return ffi::Error::Success();
}

// An operand's base for vmap element `b`: its own part when it has the leading dimensions, the shared
// whole when it has none (or only size-1 ones, as 'expand_dims' gives an unbatched operand). `size` is
// one element's size: C for the per-channel float32 operands, rows x C for the activations.
float* Channelwise(void* base, size_t elements, int64_t c, int64_t b) {
  float* p = static_cast<float*>(base);
  return static_cast<int64_t>(elements) == c ? p : p + b * c;
}
void* Activation(void* base, size_t elements, const NormGeometry& g, int64_t b) {
  const int64_t size = g.rows * g.c;
  if (static_cast<int64_t>(elements) == size) return base;
  return static_cast<char*>(base) + b * size * (g.type == dt::bf16 ? 2 : 4);
}

// Vmap element `b`'s part of a workspace operand (uint8, `desc`'s size per element).
void* WorkspaceOf(ffi::AnyBuffer workspace, const memory::desc& desc, int64_t b) {
  return static_cast<char*>(workspace.untyped_data()) + b * desc.get_size();
}

template <typename F>
ffi::Error NormRun(const char* kind, F element, int64_t count) {
  std::string error;
  Execute([&] {
    try {
      for (int64_t b = 0; b < count; ++b) element(b);
    } catch (const std::exception& e) {
      error = e.what();
    }
  });
  if (!error.empty()) return ffi::Error::Internal(std::string("onednn_batch_norm ") + kind + ": " + error);
  return ffi::Error::Success();
}

ffi::Error BatchNormForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer shift,
                                ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                                ffi::Result<ffi::AnyBuffer> var, ffi::Result<ffi::AnyBuffer> workspace,
                                int64_t rank, float epsilon, bool relu) {
  NormGeometry g;
  int64_t count;
  ffi::Error err = MakeNormGeometry(x, y->element_count(), rank, epsilon, relu, &g, &count);
  if (err.failure()) return err;
  return NormRun("forward", [&](int64_t b) {
    std::shared_ptr<NormEntry> entry = NormLookup("bn_fwd", g);
    engine& eng = CpuEngine();
    stream s(eng);
    memory src(g.Data(), eng, Activation(x.untyped_data(), x.element_count(), g, b));
    memory dst(g.Data(), eng, Activation(y->untyped_data(), y->element_count(), g, b));
    memory m(g.Channels(), eng, Channelwise(mean->untyped_data(), mean->element_count(), g.c, b));
    memory v(g.Channels(), eng, Channelwise(var->untyped_data(), var->element_count(), g.c, b));
    memory sc(g.Channels(), eng, Channelwise(scale.untyped_data(), scale.element_count(), g.c, b));
    memory sh(g.Channels(), eng, Channelwise(shift.untyped_data(), shift.element_count(), g.c, b));
    memory scratch(entry->scratchpad, eng, ThreadBuffer(1, entry->scratchpad.get_size()));
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}, {DNNL_ARG_MEAN, m},
                                         {DNNL_ARG_VARIANCE, v}, {DNNL_ARG_SCALE, sc},
                                         {DNNL_ARG_SHIFT, sh}, {DNNL_ARG_SCRATCHPAD, scratch}};
    if (g.relu) {
      args[DNNL_ARG_WORKSPACE] = memory(entry->workspace, eng, WorkspaceOf(*workspace, entry->workspace, b));
    }
    entry->prim.execute(s, args);
    s.wait();
  }, count);
}

ffi::Error BatchNormBackwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer mean,
                                 ffi::AnyBuffer var, ffi::AnyBuffer scale, ffi::AnyBuffer workspace,
                                 ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dscale,
                                 ffi::Result<ffi::AnyBuffer> dshift, int64_t rank, float epsilon,
                                 bool relu) {
  NormGeometry g;
  int64_t count;
  ffi::Error err = MakeNormGeometry(x, dx->element_count(), rank, epsilon, relu, &g, &count);
  if (err.failure()) return err;
  if (dy.element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("onednn_batch_norm: the input and its gradient differ in dtype");
  }
  return NormRun("backward", [&](int64_t b) {
    std::shared_ptr<NormEntry> entry = NormLookup("bn_bwd", g);
    engine& eng = CpuEngine();
    stream s(eng);
    memory src(g.Data(), eng, Activation(x.untyped_data(), x.element_count(), g, b));
    memory diff_dst(g.Data(), eng, Activation(dy.untyped_data(), dy.element_count(), g, b));
    memory diff_src(g.Data(), eng, Activation(dx->untyped_data(), dx->element_count(), g, b));
    memory m(g.Channels(), eng, Channelwise(mean.untyped_data(), mean.element_count(), g.c, b));
    memory v(g.Channels(), eng, Channelwise(var.untyped_data(), var.element_count(), g.c, b));
    memory sc(g.Channels(), eng, Channelwise(scale.untyped_data(), scale.element_count(), g.c, b));
    memory dsc(g.Channels(), eng, Channelwise(dscale->untyped_data(), dscale->element_count(), g.c, b));
    memory dsh(g.Channels(), eng, Channelwise(dshift->untyped_data(), dshift->element_count(), g.c, b));
    memory scratch(entry->scratchpad, eng, ThreadBuffer(1, entry->scratchpad.get_size()));
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, src},         {DNNL_ARG_DIFF_DST, diff_dst},     {DNNL_ARG_MEAN, m},
        {DNNL_ARG_VARIANCE, v},      {DNNL_ARG_SCALE, sc},              {DNNL_ARG_DIFF_SRC, diff_src},
        {DNNL_ARG_DIFF_SCALE, dsc},  {DNNL_ARG_DIFF_SHIFT, dsh},        {DNNL_ARG_SCRATCHPAD, scratch}};
    if (g.relu) {
      args[DNNL_ARG_WORKSPACE] = memory(entry->workspace, eng, WorkspaceOf(workspace, entry->workspace, b));
    }
    entry->prim.execute(s, args);
    s.wait();
  }, count);
}

}  // namespace

#define CONV_ATTRS                 \
  .Attr<int64_t>("stride_h")       \
      .Attr<int64_t>("stride_w")   \
      .Attr<int64_t>("pad_top")    \
      .Attr<int64_t>("pad_bottom") \
      .Attr<int64_t>("pad_left")   \
      .Attr<int64_t>("pad_right")  \
      .Attr<int64_t>("groups")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, BackwardDataImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, BackwardWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnBatchNormForward, BatchNormForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("rank")
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnBatchNormBackward, BatchNormBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("rank")
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("relu"));

// The workspace (bytes) oneDNN's ReLU-fused batch normalisation of an (n, ..., c) activation with `rows`
// rows needs (its mask), for the Python side to allocate it as a uint8 operand; -1 on an error.
extern "C" int64_t onednn_batch_norm_workspace_bytes(int64_t n, int64_t rows, int64_t c, int bf16,
                                                     float epsilon) {
  try {
    NormGeometry g{n, rows, c, bf16 ? dt::bf16 : dt::f32, epsilon, true};
    return static_cast<int64_t>(NormForwardDesc(g).workspace_desc().get_size());
  } catch (const std::exception&) {
    return -1;
  }
}

// 1: every call runs on the library's thread (one OpenMP team); 0: on the thread that makes it.
extern "C" void cifar_jax_onednn_set_one_thread(int on) { one_thread.store(on != 0); }

extern "C" int onednn_conv_abi_version() { return 5; }
