// 2-D convolutions for XLA:CPU through oneDNN, as XLA FFI handlers (see cifar_jax/onednn_conv.py).
//
// Layouts are the trainer's: activations NHWC, kernels HWIO, float32. Three handlers cover a training
// step: forward, the gradient with respect to the input (backward data) and the gradient with respect to
// the kernel (backward weights). oneDNN's NHWC kernels read and write the activations where they lie, so
// none of the transposes XLA's own convolutions need around the weight gradient happen here; kernels are
// reordered to whatever blocked layout oneDNN picks (they are small). Primitives are built once per shape
// and cached.

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

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

  memory::desc Src(tag t = tag::nhwc) const { return memory::desc({n, c, h, w}, dt::f32, t); }
  memory::desc Dst(tag t = tag::nhwc) const { return memory::desc({n, o, oh, ow}, dt::f32, t); }
  memory::desc Weights(tag t) const { return memory::desc({o, c, kh, kw}, dt::f32, t); }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb, pr}; }

  std::string Key(const char* kind) const {
    std::string key(kind);
    for (int64_t v : {n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr}) {
      key += ',' + std::to_string(v);
    }
    return key;
  }
};

ffi::Error MakeGeometry(ffi::Span<const int64_t> in, ffi::Span<const int64_t> kernel,
                        ffi::Span<const int64_t> out, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                        int64_t pl, int64_t pr, Geometry* g) {
  if (in.size() != 4 || kernel.size() != 4 || out.size() != 4) {
    return ffi::Error::InvalidArgument("onednn_conv: expected NHWC activations and an HWIO kernel");
  }
  *g = Geometry{in[0],  in[1],  in[2],  in[3], kernel[0], kernel[1], kernel[3], out[1],
                out[2], sh,     sw,     pt,    pb,        pl,        pr};
  if (kernel[2] != in[3] || out[0] != in[0] || out[3] != kernel[3] ||
      g->oh != (g->h + pt + pb - g->kh) / sh + 1 || g->ow != (g->w + pl + pr - g->kw) / sw + 1) {
    return ffi::Error::InvalidArgument("onednn_conv: inconsistent shapes");
  }
  return ffi::Error::Success();
}

// A cached primitive with the kernel layout it wants and the reorder to or from HWIO when that differs.
struct Entry {
  dnnl::primitive conv;
  memory::desc weights;  // the layout the primitive reads or writes its kernel in
  bool reorder_weights = false;
  reorder weights_reorder;  // HWIO -> `weights` (forward, backward data), or back (weights)
  std::unique_ptr<memory> blocked;  // the reordered kernel's buffer, kept between calls
};

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<Entry>>& Cache() {
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Entry>>();
  return *cache;
}

convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return convolution_forward::primitive_desc(
      CpuEngine(), prop_kind::forward_training, algorithm::convolution_direct, g.Src(),
      g.Weights(tag::any), g.Dst(), g.Strides(), g.PadL(), g.PadR());
}

std::shared_ptr<Entry> Lookup(const char* kind, const Geometry& g) {
  std::string key = g.Key(kind);
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = Cache().find(key);
  if (it != Cache().end()) return it->second;

  auto entry = std::make_shared<Entry>();
  memory::desc hwio = g.Weights(tag::hwio);
  std::string k(kind);
  if (k == "fwd") {
    auto pd = ForwardDesc(g);
    entry->conv = convolution_forward(pd);
    entry->weights = pd.weights_desc();
  } else if (k == "bwd_data") {
    auto pd = convolution_backward_data::primitive_desc(
        CpuEngine(), algorithm::convolution_direct, g.Src(), g.Weights(tag::any), g.Dst(),
        g.Strides(), g.PadL(), g.PadR(), ForwardDesc(g));
    entry->conv = convolution_backward_data(pd);
    entry->weights = pd.weights_desc();
  } else {
    auto pd = convolution_backward_weights::primitive_desc(
        CpuEngine(), algorithm::convolution_direct, g.Src(), g.Weights(tag::any), g.Dst(),
        g.Strides(), g.PadL(), g.PadR(), ForwardDesc(g));
    entry->conv = convolution_backward_weights(pd);
    entry->weights = pd.diff_weights_desc();
  }
  entry->reorder_weights = entry->weights != hwio;
  if (entry->reorder_weights) {
    entry->blocked = std::make_unique<memory>(entry->weights, CpuEngine());
    entry->weights_reorder = k == "bwd_weights"
                                 ? reorder(reorder::primitive_desc(CpuEngine(), entry->weights,
                                                                   CpuEngine(), hwio))
                                 : reorder(reorder::primitive_desc(CpuEngine(), hwio, CpuEngine(),
                                                                   entry->weights));
  }
  Cache()[key] = entry;
  return entry;
}

// Runs `kind` with `act` (the NHWC tensor on the input side: src or diff_src) and `grad_or_dst` (the
// NHWC tensor on the output side: dst or diff_dst); `kernel` is the HWIO kernel (or diff kernel).
// XLA:CPU may run independent thunks at once (a layer's backward-data and backward-weights calls);
// each oneDNN call already spreads over every core, so they take turns instead of oversubscribing them.
std::mutex execute_mutex;

ffi::Error Run(const char* kind, const Geometry& g, float* act, float* out_side, float* kernel) {
  try {
    std::shared_ptr<Entry> entry = Lookup(kind, g);
    std::lock_guard<std::mutex> lock(execute_mutex);
    engine& eng = CpuEngine();
    stream s(eng);
    memory act_mem(g.Src(), eng, act);
    memory out_mem(g.Dst(), eng, out_side);
    memory hwio_mem(g.Weights(tag::hwio), eng, kernel);
    memory weights_mem = entry->reorder_weights ? *entry->blocked : hwio_mem;
    std::string k(kind);
    if (k == "fwd") {
      if (entry->reorder_weights) entry->weights_reorder.execute(s, hwio_mem, weights_mem);
      entry->conv.execute(s, {{DNNL_ARG_SRC, act_mem},
                              {DNNL_ARG_WEIGHTS, weights_mem},
                              {DNNL_ARG_DST, out_mem}});
    } else if (k == "bwd_data") {
      if (entry->reorder_weights) entry->weights_reorder.execute(s, hwio_mem, weights_mem);
      entry->conv.execute(s, {{DNNL_ARG_DIFF_DST, out_mem},
                              {DNNL_ARG_WEIGHTS, weights_mem},
                              {DNNL_ARG_DIFF_SRC, act_mem}});
    } else {
      entry->conv.execute(s, {{DNNL_ARG_SRC, act_mem},
                              {DNNL_ARG_DIFF_DST, out_mem},
                              {DNNL_ARG_DIFF_WEIGHTS, weights_mem}});
      if (entry->reorder_weights) entry->weights_reorder.execute(s, weights_mem, hwio_mem);
    }
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv ") + kind + ": " + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                       int64_t pb, int64_t pl, int64_t pr) {
  Geometry g;
  ffi::Error err =
      MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr, &g);
  if (err.failure()) return err;
  return Run("fwd", g, x.typed_data(), y->typed_data(), w.typed_data());
}

ffi::Error BackwardDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                            int64_t pb, int64_t pl, int64_t pr) {
  Geometry g;
  ffi::Error err =
      MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr, &g);
  if (err.failure()) return err;
  return Run("bwd_data", g, dx->typed_data(), dy.typed_data(), w.typed_data());
}

ffi::Error BackwardWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                               int64_t pb, int64_t pl, int64_t pr) {
  Geometry g;
  ffi::Error err =
      MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr, &g);
  if (err.failure()) return err;
  return Run("bwd_weights", g, x.typed_data(), dy.typed_data(), dw->typed_data());
}

}  // namespace

#define CONV_ATTRS                 \
  .Attr<int64_t>("stride_h")       \
      .Attr<int64_t>("stride_w")   \
      .Attr<int64_t>("pad_top")    \
      .Attr<int64_t>("pad_bottom") \
      .Attr<int64_t>("pad_left")   \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, BackwardDataImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, BackwardWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

extern "C" int onednn_conv_abi_version() { return 1; }
