// kernels._epd_jpeg: batched JPEG decode on nvjpeg's hardware engine, with allocators that never
// synchronize the device.
//
// Why not torchvision.io.decode_jpeg: its nvjpeg handle uses the default allocators (cudaMalloc /
// cudaFree, cudaHostAlloc / cudaFreeHost), and cudaFree and cudaFreeHost wait for all work on the
// device. In an encoder the tower runs on another stream of the same process, so every decode waited
// for the tower to finish (profile_encoder.py on the H200: 2.9 ms alone, 7.1 ms during a tower), and
// the preprocessing thread's pipeline hid almost nothing. Here device memory comes from a memory pool
// of the decoder's own, stream-ordered (cudaMallocFromPoolAsync / cudaFreeAsync), and pinned host
// buffers are kept for reuse, each reused only once the copies that last read it are done (an event).
//
// Output: for each image, [3, H, W] uint8 on the decoder's device (planar RGB: the format torchvision
// asks nvjpeg for, so the pixels are the same), or None where the hardware cannot decode it (the
// caller decodes those another way). The work is queued on the current CUDA stream, not waited for.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <nvjpeg.h>
#include <torch/extension.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

namespace epd {
namespace {

#define EPD_NVJPEG_CHECK(expr, what)                                                            \
  do {                                                                                         \
    nvjpegStatus_t status_ = (expr);                                                           \
    TORCH_CHECK(status_ == NVJPEG_STATUS_SUCCESS, "nvjpeg: ", what, " failed (status ",       \
                static_cast<int>(status_), ")");                                               \
  } while (0)

int device_malloc(void* ctx, void** ptr, size_t size, cudaStream_t stream) {
  return cudaMallocFromPoolAsync(ptr, size, static_cast<cudaMemPool_t>(ctx), stream) == cudaSuccess ? 0 : 1;
}

int device_free(void* /*ctx*/, void* ptr, size_t /*size*/, cudaStream_t stream) {
  return cudaFreeAsync(ptr, stream) == cudaSuccess ? 0 : 1;
}

// Pinned host buffers kept for reuse: a freed buffer goes back with an event recorded on the stream
// that freed it, and is handed out again only once that event has completed.
class PinnedPool {
 public:
  int alloc(void** ptr, size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.lower_bound(size); it != free_.end(); ++it) {
      if (cudaEventQuery(it->second.ready) == cudaSuccess) {
        *ptr = it->second.ptr;
        in_use_[*ptr] = it->first;
        events_.push_back(it->second.ready);
        free_.erase(it);
        return 0;
      }
    }
    (void)cudaGetLastError();  // cudaEventQuery's cudaErrorNotReady is not an error here
    if (cudaHostAlloc(ptr, size, cudaHostAllocDefault) != cudaSuccess) return 1;
    in_use_[*ptr] = size;
    return 0;
  }

  int release(void* ptr, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = in_use_.find(ptr);
    if (it == in_use_.end()) return 1;
    cudaEvent_t ready;
    if (!events_.empty()) {
      ready = events_.back();
      events_.pop_back();
    } else if (cudaEventCreateWithFlags(&ready, cudaEventDisableTiming) != cudaSuccess) {
      return 1;
    }
    if (cudaEventRecord(ready, stream) != cudaSuccess) return 1;
    free_.emplace(it->second, Entry{ptr, ready});
    in_use_.erase(it);
    return 0;
  }

 private:
  struct Entry {
    void* ptr;
    cudaEvent_t ready;
  };
  std::mutex mu_;
  std::multimap<size_t, Entry> free_;       // capacity -> buffer
  std::unordered_map<void*, size_t> in_use_;  // buffer -> capacity
  std::vector<cudaEvent_t> events_;         // spare events
};

int pinned_malloc(void* ctx, void** ptr, size_t size, cudaStream_t /*stream*/) {
  return static_cast<PinnedPool*>(ctx)->alloc(ptr, size);
}

int pinned_free(void* ctx, void* ptr, size_t /*size*/, cudaStream_t stream) {
  return static_cast<PinnedPool*>(ctx)->release(ptr, stream);
}

class JpegDecoder {
 public:
  explicit JpegDecoder(int device) : device_(device) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    C10_CUDA_CHECK(cudaMemPoolCreate(&pool_, &props));
    uint64_t keep = UINT64_MAX;  // never give the pool's memory back between calls
    C10_CUDA_CHECK(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &keep));
    device_allocator_ = {device_malloc, device_free, pool_};
    pinned_allocator_ = {pinned_malloc, pinned_free, &pinned_};
    nvjpegStatus_t status = nvjpegCreateExV2(NVJPEG_BACKEND_HARDWARE, &device_allocator_, &pinned_allocator_,
                                             NVJPEG_FLAGS_DEFAULT, &handle_);
    if (status != NVJPEG_STATUS_SUCCESS) {  // no hardware JPEG engine on this GPU (or no nvjpeg support)
      handle_ = nullptr;
      create_status_ = static_cast<int>(status);
      return;
    }
    EPD_NVJPEG_CHECK(nvjpegJpegStateCreate(handle_, &state_), "nvjpegJpegStateCreate");
    EPD_NVJPEG_CHECK(nvjpegJpegStreamCreate(handle_, &parsed_), "nvjpegJpegStreamCreate");
  }

  // Never destroyed: one per device for the life of the process (as torchvision's), since
  // destroying nvjpeg state after CUDA's own teardown at exit can crash.
  JpegDecoder(const JpegDecoder&) = delete;
  JpegDecoder& operator=(const JpegDecoder&) = delete;

  bool hardware() const { return handle_ != nullptr; }
  int create_status() const { return create_status_; }

  std::vector<std::optional<at::Tensor>> decode(const std::vector<at::Tensor>& data) {
    TORCH_CHECK(hardware(), "JpegDecoder: no hardware JPEG decoder on cuda:", device_, " (nvjpegCreateExV2 status ",
                create_status_, ")");
    std::vector<at::Tensor> inputs;
    inputs.reserve(data.size());
    for (size_t i = 0; i < data.size(); ++i) {
      const at::Tensor& x = data[i];
      TORCH_CHECK(!x.is_cuda() && x.scalar_type() == at::kByte && x.dim() == 1 && x.numel() > 0,
                  "JpegDecoder.decode: image ", i, ": expected a non-empty 1-D uint8 CPU tensor");
      inputs.push_back(x.contiguous());
    }
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
    std::lock_guard<std::mutex> lock(mu_);

    std::vector<std::optional<at::Tensor>> out(inputs.size());
    std::vector<const unsigned char*> ptrs;
    std::vector<size_t> lengths;
    std::vector<nvjpegImage_t> images;
    auto options = at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device_);
    for (size_t i = 0; i < inputs.size(); ++i) {
      const auto* bytes = inputs[i].data_ptr<unsigned char>();
      const size_t length = static_cast<size_t>(inputs[i].numel());
      int components = 0, widths[NVJPEG_MAX_COMPONENT] = {}, heights[NVJPEG_MAX_COMPONENT] = {};
      nvjpegChromaSubsampling_t subsampling;
      if (nvjpegGetImageInfo(handle_, bytes, length, &components, &subsampling, widths, heights) !=
              NVJPEG_STATUS_SUCCESS ||
          components != 3 || subsampling == NVJPEG_CSS_UNKNOWN ||
          nvjpegJpegStreamParseHeader(handle_, bytes, length, parsed_) != NVJPEG_STATUS_SUCCESS) {
        continue;  // not for the hardware: the caller decodes it (and reports what is wrong with it)
      }
      int unsupported = 1;
      if (nvjpegDecodeBatchedSupported(handle_, parsed_, &unsupported) != NVJPEG_STATUS_SUCCESS || unsupported) {
        continue;
      }
      at::Tensor planes = at::empty({3, heights[0], widths[0]}, options);
      nvjpegImage_t image = {};
      for (int c = 0; c < 3; ++c) {
        image.channel[c] = planes[c].data_ptr<unsigned char>();
        image.pitch[c] = static_cast<size_t>(widths[0]);
      }
      out[i] = planes;
      ptrs.push_back(bytes);
      lengths.push_back(length);
      images.push_back(image);
    }
    if (images.empty()) return out;
    const int batch = static_cast<int>(images.size());
    if (batch != batch_size_) {  // "once for batches of this size" (nvjpeg.h); reset after a failure
      batch_size_ = -1;
      EPD_NVJPEG_CHECK(nvjpegDecodeBatchedInitialize(handle_, state_, batch, 1, NVJPEG_OUTPUT_RGB),
                       "nvjpegDecodeBatchedInitialize");
      batch_size_ = batch;
    }
    nvjpegStatus_t status = nvjpegDecodeBatched(handle_, state_, ptrs.data(), lengths.data(), images.data(), stream);
    if (status != NVJPEG_STATUS_SUCCESS) {
      batch_size_ = -1;
      TORCH_CHECK(false, "nvjpeg: nvjpegDecodeBatched failed (status ", static_cast<int>(status), ")");
    }
    return out;
  }

 private:
  int device_;
  int create_status_ = 0;
  int batch_size_ = -1;
  cudaMemPool_t pool_ = nullptr;
  PinnedPool pinned_;
  nvjpegDevAllocatorV2_t device_allocator_{};
  nvjpegPinnedAllocatorV2_t pinned_allocator_{};
  nvjpegHandle_t handle_ = nullptr;
  nvjpegJpegState_t state_ = nullptr;
  nvjpegJpegStream_t parsed_ = nullptr;  // the header being checked
  std::mutex mu_;
};

}  // namespace
}  // namespace epd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "EPD engine: batched JPEG decode on nvjpeg's hardware engine (kernels/jpeg/decoder.cpp)";
  pybind11::class_<epd::JpegDecoder>(m, "JpegDecoder")
      .def(pybind11::init<int>(), pybind11::arg("device"))
      .def_property_readonly("hardware", &epd::JpegDecoder::hardware)
      .def_property_readonly("create_status", &epd::JpegDecoder::create_status)
      .def("decode", &epd::JpegDecoder::decode, pybind11::arg("data"),
           pybind11::call_guard<pybind11::gil_scoped_release>(),
           "[1-D uint8 CPU tensors of JPEG bytes] -> [[3, H, W] uint8 on the device, or None], queued on the "
           "current stream");
}
