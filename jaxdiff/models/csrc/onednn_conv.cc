// oneDNN 2-D convolutions as XLA FFI handlers, for jaxdiff.models.onednn_conv.
//
// Three handlers, all float32, NHWC activations and HWIO kernels (jaxdiff's layouts):
//   jaxdiff_onednn_conv_fwd          y  = conv(x, w)
//   jaxdiff_onednn_conv_bwd_data     dx = d conv / d x  applied to dy   (result shape = x)
//   jaxdiff_onednn_conv_bwd_weights  dw = d conv / d w  applied to dy   (result shape = w)
// Attributes: stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right (zero padding).
// Primitives are created once per shape and kept; the kernel is reordered from HWIO into the
// layout oneDNN picks ("any") at each call. Built on first use by onednn_conv.py with g++,
// against the oneDNN of the system (2.x, or 3.x) and jax.ffi.include_dir().

#include <array>
#include <functional>
#include <map>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

using Dims = std::array<int64_t, 4>;
using Key = std::array<int64_t, 16>;

struct Geometry {
  int64_t n, h, w, ci, oh, ow, co, kh, kw;
  memory::dims strides, pad_l, pad_r;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::desc Nhwc(int64_t n, int64_t c, int64_t h, int64_t w) {
  return memory::desc({n, c, h, w}, memory::data_type::f32, memory::format_tag::nhwc);
}
memory::desc Hwio(const Geometry& g) {
  return memory::desc({g.co, g.ci, g.kh, g.kw}, memory::data_type::f32, memory::format_tag::hwio);
}
memory::desc AnyWeights(const Geometry& g) {
  return memory::desc({g.co, g.ci, g.kh, g.kw}, memory::data_type::f32, memory::format_tag::any);
}

Geometry MakeGeometry(Dims x, Dims w, Dims y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                      int64_t pl, int64_t pr) {
  return Geometry{x[0], x[1], x[2], x[3], y[1], y[2], y[3], w[0], w[1], {sh, sw}, {pt, pl},
                  {pb, pr}};
}

Key MakeKey(int64_t kind, const Geometry& g) {
  return Key{kind, g.n, g.h, g.w, g.ci, g.oh, g.ow, g.co, g.kh, g.kw, g.strides[0], g.strides[1],
             g.pad_l[0], g.pad_l[1], g.pad_r[0], g.pad_r[1]};
}

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g, dnnl::prop_kind prop) {
#if DNNL_VERSION_MAJOR >= 3
  return dnnl::convolution_forward::primitive_desc(
      Engine(), prop, dnnl::algorithm::convolution_direct, Nhwc(g.n, g.ci, g.h, g.w),
      AnyWeights(g), Nhwc(g.n, g.co, g.oh, g.ow), g.strides, g.pad_l, g.pad_r);
#else
  dnnl::convolution_forward::desc desc(prop, dnnl::algorithm::convolution_direct,
                                       Nhwc(g.n, g.ci, g.h, g.w), AnyWeights(g),
                                       Nhwc(g.n, g.co, g.oh, g.ow), g.strides, g.pad_l, g.pad_r);
  return dnnl::convolution_forward::primitive_desc(desc, Engine());
#endif
}

// One cached primitive and the weights layout it wants.
struct Entry {
  dnnl::primitive primitive;
  memory::desc weights;
};

std::mutex cache_mutex;
std::map<Key, Entry>& Cache() {
  static std::map<Key, Entry> cache;
  return cache;
}

template <typename Make>
const Entry& Cached(const Key& key, Make make) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = Cache().find(key);
  if (it == Cache().end()) it = Cache().emplace(key, make()).first;
  return it->second;
}

Entry MakeForward(const Geometry& g) {
  auto pd = ForwardPd(g, dnnl::prop_kind::forward_inference);
  return Entry{dnnl::convolution_forward(pd), pd.weights_desc()};
}

// The primitive descriptor of convolution_backward_data or convolution_backward_weights: both
// take (algorithm, input, kernel, output, strides, padding) descriptors and a forward hint.
template <typename Backward>
typename Backward::primitive_desc BackwardPd(const Geometry& g) {
  auto hint = ForwardPd(g, dnnl::prop_kind::forward_training);
#if DNNL_VERSION_MAJOR >= 3
  return typename Backward::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, Nhwc(g.n, g.ci, g.h, g.w), AnyWeights(g),
      Nhwc(g.n, g.co, g.oh, g.ow), g.strides, g.pad_l, g.pad_r, hint);
#else
  typename Backward::desc desc(dnnl::algorithm::convolution_direct, Nhwc(g.n, g.ci, g.h, g.w),
                               AnyWeights(g), Nhwc(g.n, g.co, g.oh, g.ow), g.strides, g.pad_l,
                               g.pad_r);
  return typename Backward::primitive_desc(desc, Engine(), hint);
#endif
}

Entry MakeBackwardData(const Geometry& g) {
  auto pd = BackwardPd<dnnl::convolution_backward_data>(g);
  return Entry{dnnl::convolution_backward_data(pd), pd.weights_desc()};
}

Entry MakeBackwardWeights(const Geometry& g) {
  auto pd = BackwardPd<dnnl::convolution_backward_weights>(g);
  return Entry{dnnl::convolution_backward_weights(pd), pd.diff_weights_desc()};
}

template <typename D>
Dims Dims4(const D& d) {
  return Dims{d[0], d[1], d[2], d[3]};
}

// One oneDNN call at a time. XLA may run independent thunks (say the input and the weight
// gradient of one convolution) on two of its threads at once; each would start its own OpenMP
// team over all cores, and two spinning teams on the same cores slow each other down by
// orders of magnitude. oneDNN already uses every core, so serializing costs nothing.
std::mutex run_mutex;

// The kernel in the layout the primitive wants: the HWIO buffer itself, or a reordered copy.
memory KernelFor(const Entry& e, const Geometry& g, float* hwio_data, dnnl::stream& stream) {
  memory hwio(Hwio(g), Engine(), hwio_data);
  if (e.weights == Hwio(g)) return hwio;
  memory blocked(e.weights, Engine());
  dnnl::reorder(hwio, blocked).execute(stream, hwio, blocked);
  return blocked;
}

ffi::Error Run(const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(run_mutex);
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                       int64_t pb, int64_t pl, int64_t pr) {
  return Run([&] {
    Geometry g = MakeGeometry(Dims4(x.dimensions()), Dims4(w.dimensions()),
                              Dims4(y->dimensions()), sh, sw, pt, pb, pl, pr);
    const Entry& e = Cached(MakeKey(0, g), [&] { return MakeForward(g); });
    dnnl::stream stream(Engine());
    memory src(Nhwc(g.n, g.ci, g.h, g.w), Engine(), x.typed_data());
    memory dst(Nhwc(g.n, g.co, g.oh, g.ow), Engine(), y->typed_data());
    memory weights = KernelFor(e, g, w.typed_data(), stream);
    e.primitive.execute(stream,
                        {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}});
    stream.wait();
  });
}

ffi::Error ConvBackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                            int64_t pb, int64_t pl, int64_t pr) {
  return Run([&] {
    Geometry g = MakeGeometry(Dims4(dx->dimensions()), Dims4(w.dimensions()),
                              Dims4(dy.dimensions()), sh, sw, pt, pb, pl, pr);
    const Entry& e = Cached(MakeKey(1, g), [&] { return MakeBackwardData(g); });
    dnnl::stream stream(Engine());
    memory diff_dst(Nhwc(g.n, g.co, g.oh, g.ow), Engine(), dy.typed_data());
    memory diff_src(Nhwc(g.n, g.ci, g.h, g.w), Engine(), dx->typed_data());
    memory weights = KernelFor(e, g, w.typed_data(), stream);
    e.primitive.execute(stream, {{DNNL_ARG_DIFF_DST, diff_dst},
                                 {DNNL_ARG_WEIGHTS, weights},
                                 {DNNL_ARG_DIFF_SRC, diff_src}});
    stream.wait();
  });
}

ffi::Error ConvBackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                               int64_t pb, int64_t pl, int64_t pr) {
  return Run([&] {
    Geometry g = MakeGeometry(Dims4(x.dimensions()), Dims4(dw->dimensions()),
                              Dims4(dy.dimensions()), sh, sw, pt, pb, pl, pr);
    const Entry& e = Cached(MakeKey(2, g), [&] { return MakeBackwardWeights(g); });
    dnnl::stream stream(Engine());
    memory src(Nhwc(g.n, g.ci, g.h, g.w), Engine(), x.typed_data());
    memory diff_dst(Nhwc(g.n, g.co, g.oh, g.ow), Engine(), dy.typed_data());
    memory hwio(Hwio(g), Engine(), dw->typed_data());
    memory diff_weights = e.weights == Hwio(g) ? hwio : memory(e.weights, Engine());
    e.primitive.execute(stream, {{DNNL_ARG_SRC, src},
                                 {DNNL_ARG_DIFF_DST, diff_dst},
                                 {DNNL_ARG_DIFF_WEIGHTS, diff_weights}});
    if (e.weights != Hwio(g)) dnnl::reorder(diff_weights, hwio).execute(stream, diff_weights, hwio);
    stream.wait();
  });
}

}  // namespace

#define JAXDIFF_CONV_ATTRS                                                             \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top")      \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxdiff_onednn_conv_fwd, ConvForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() JAXDIFF_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxdiff_onednn_conv_bwd_data, ConvBackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() JAXDIFF_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxdiff_onednn_conv_bwd_weights, ConvBackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() JAXDIFF_CONV_ATTRS);
