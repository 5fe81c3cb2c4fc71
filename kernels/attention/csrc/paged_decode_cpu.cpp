// Paged decode attention for CPU float32, straight off the shared KV-cache format.
//
// One query token per sequence attends to its whole cached sequence, reading K and V through the
// block table where they lie: no gather copy, no padding, no mask. Optionally the step's new K/V
// rows are written into their slots first, so a decode layer's attention is a single call.
//
// Layouts (see kernels/kv_cache/layout.py and kernels/attention/metadata.py):
//   q            [num_seqs, num_heads, head_dim]                  float32, contiguous
//   k/v_cache    [num_blocks, block_size, num_kv_heads, head_dim]  float32, last two dims contiguous
//                (any block/slot strides: the K and V halves of a packed layer are views)
//   block_tables [num_seqs, max_blocks]                            int32, contiguous
//   seq_lens     [num_seqs]                                        int32 (the new token included)
//   k/v_new      [num_seqs, num_kv_heads, head_dim]                float32, optional
//   slot_mapping [num_seqs]                                        int64, -1 = skip, optional
//   out          [num_seqs, num_heads, head_dim]                   float32, contiguous
// Query head h reads KV head h / (num_heads / num_kv_heads), as in grouped-query attention.
//
// The arithmetic is paged_attention_cpu.h's (shared with the edge engine's ONNX Runtime op): a two-pass
// float32 softmax per query head, a sequence's heads being one tile (its K/V rows read whole). Work items
// are sequences; with threads > 1 and enough K/V to read, they are shared with sleeping worker threads (a decode
// step's attention is bound by memory bandwidth, which one core does not saturate).

#include <torch/extension.h>

#include "paged_attention_cpu.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

namespace {

using hgw::kHaveAvx2;

struct Args {
  hgw::PagedKV kv;
  const float* q;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  float* out;
  int64_t num_seqs, num_heads, num_kv_heads, num_blocks, max_blocks;
  hgw::AttendFn attend;
};

// Every sequence length and every block it reads checked before any work starts (workers must not throw).
void validate(const Args& a) {
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    const std::string s_idx = std::to_string(s);
    const std::string error = hgw::check_table(a.block_tables + s * a.max_blocks, a.seq_lens[s], a.max_blocks,
                                               a.kv.block_size, a.num_blocks, "seq_lens[" + s_idx + "]",
                                               "block_tables[" + s_idx);
    TORCH_CHECK(error.empty(), "paged_decode_cpu: ", error);
  }
}

// One work item: sequence s with every KV head, each with the query heads of its group (one tile).
void decode_item(const Args& a, int64_t s) {
  const int64_t group = a.num_heads / a.num_kv_heads;
  thread_local std::vector<const float*> q;
  thread_local std::vector<float*> out;
  thread_local std::vector<int64_t> lens;
  q.resize(a.num_heads);
  out.resize(a.num_heads);
  lens.assign(group, a.seq_lens[s]);
  for (int64_t h = 0; h < a.num_heads; ++h) {  // query head h = KV head h / group, row h % group
    const int64_t row = (s * a.num_heads + h) * a.kv.head_dim;
    q[h] = a.q + row;
    out[h] = a.out + row;
  }
  a.attend(a.kv, hgw::Tile{a.block_tables + s * a.max_blocks, 0, a.num_kv_heads, group, q.data(), out.data(),
                           lens.data()});
}

// A few worker threads that sleep between calls (no spinning: between layers the cores belong to ONNX Runtime
// or to the other ranks). Items are handed out through an atomic counter; the calling thread works too.
class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
    for (auto& t : threads_) t.detach();  // never joined: the pool lives as long as the process
  }

  int workers() const { return static_cast<int>(threads_.size()); }

  // Runs fn(0) .. fn(total - 1) on the caller and up to `helpers` workers. Returns false, having run nothing,
  // when another caller has the pool (two engines in one process): that caller then works alone.
  bool run(int64_t total, int helpers, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> owner(run_mu_, std::try_to_lock);
    if (!owner.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      total_ = total;
      next_.store(0);
      wanted_ = std::min(helpers, workers());
      busy_ = wanted_;
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mu_);
    // Workers that have not woken up yet are not waited for: every item is taken, so their slots are void.
    busy_ -= wanted_;
    wanted_ = 0;
    done_.wait(lock, [this] { return busy_ == 0; });
    fn_ = nullptr;
    return true;
  }

 private:
  void drain() {
    for (int64_t i = next_.fetch_add(1); i < total_; i = next_.fetch_add(1)) (*fn_)(i);
  }

  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen && wanted_ > 0; });
      seen = generation_;
      --wanted_;
      lock.unlock();
      drain();
      lock.lock();
      if (--busy_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex run_mu_, mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t total_ = 0;
  std::atomic<int64_t> next_{0};
  int wanted_ = 0, busy_ = 0;
  uint64_t generation_ = 0;
};

Pool& pool_for(int workers) {
  // One pool per process (a forked child gets a fresh one: the parent's threads are not in it), grown on demand.
  static std::mutex mu;
  static Pool* pool = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(mu);
  if (pool == nullptr || owner != getpid() || pool->workers() < workers) {
    pool = new Pool(std::max(workers, pool != nullptr && owner == getpid() ? pool->workers() : 0));  // old one leaks
    owner = getpid();
  }
  return *pool;
}

// Below this much K/V (floats read per call), waking a worker costs more than it saves.
constexpr int64_t kParallelMinFloats = 192 * 1024;

void decode(const Args& a, int threads) {
  validate(a);
  const int64_t items = a.num_seqs;
  int64_t floats = 0;
  for (int64_t s = 0; s < a.num_seqs; ++s) floats += 2 * a.seq_lens[s] * a.num_kv_heads * a.kv.head_dim;
  if (threads <= 1 || items < 2 || floats < kParallelMinFloats) {
    for (int64_t i = 0; i < items; ++i) decode_item(a, i);
    return;
  }
  const std::function<void(int64_t)> fn = [&a](int64_t i) { decode_item(a, i); };
  const int helpers = static_cast<int>(std::min<int64_t>(threads - 1, items - 1));
  if (!pool_for(helpers).run(items, helpers, fn)) {
    for (int64_t i = 0; i < items; ++i) fn(i);
  }
}

void check_cache(const torch::Tensor& cache, const char* name) {
  TORCH_CHECK(cache.device().is_cpu() && cache.scalar_type() == torch::kFloat32, "paged_decode_cpu: ", name,
              " must be a float32 CPU tensor");
  TORCH_CHECK(cache.dim() == 4, "paged_decode_cpu: ", name, " must be [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(cache.stride(3) == 1 && cache.stride(2) == cache.size(3), "paged_decode_cpu: ", name,
              " needs contiguous [num_kv_heads, head_dim] rows");
}

// Scatter the step's new K/V rows into their cache slots (slot -1 = skip).
void write_rows(const torch::Tensor& rows, const torch::Tensor& cache, const int64_t* slots, int64_t n, const char* name) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == torch::kFloat32 && rows.is_contiguous(),
              "paged_decode_cpu: ", name, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(rows.dim() == 3 && rows.size(0) == n && rows.size(1) == cache.size(2) && rows.size(2) == cache.size(3),
              "paged_decode_cpu: ", name, " must be [num_seqs, num_kv_heads, head_dim]");
  const int64_t row = cache.size(2) * cache.size(3);
  const int64_t block_size = cache.size(1);
  const int64_t num_slots = cache.size(0) * block_size;
  const float* src = rows.data_ptr<float>();
  float* dst = cache.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = slots[i];
    if (slot < 0) continue;
    TORCH_CHECK(slot < num_slots, "paged_decode_cpu: slot_mapping[", i, "] = ", slot, " is past the cache (",
                num_slots, " slots)");
    float* d = dst + (slot / block_size) * cache.stride(0) + (slot % block_size) * cache.stride(1);
    std::copy(src + i * row, src + (i + 1) * row, d);
  }
}

}  // namespace

void paged_decode_cpu(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                      const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale,
                      const torch::Tensor& out, const c10::optional<torch::Tensor>& k_new,
                      const c10::optional<torch::Tensor>& v_new, const c10::optional<torch::Tensor>& slot_mapping,
                      bool portable, int64_t threads) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == torch::kFloat32 && q.is_contiguous() && q.dim() == 3,
              "paged_decode_cpu: q must be a contiguous float32 CPU tensor [num_seqs, num_heads, head_dim]");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.sizes() == q.sizes(),
              "paged_decode_cpu: out must be a contiguous float32 tensor shaped like q");
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "paged_decode_cpu: k_cache and v_cache differ in shape");
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "paged_decode_cpu: head_dim of q and cache differ");
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0,
              "paged_decode_cpu: num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.is_contiguous() && block_tables.dim() == 2 &&
                  block_tables.size(0) == num_seqs,
              "paged_decode_cpu: block_tables must be contiguous int32 [num_seqs, max_blocks]");
  TORCH_CHECK(seq_lens.scalar_type() == torch::kInt32 && seq_lens.is_contiguous() && seq_lens.dim() == 1 &&
                  seq_lens.size(0) == num_seqs,
              "paged_decode_cpu: seq_lens must be contiguous int32 [num_seqs]");
  if (slot_mapping.has_value()) {
    TORCH_CHECK(k_new.has_value() && v_new.has_value(), "paged_decode_cpu: slot_mapping needs k_new and v_new");
    const auto& slots = *slot_mapping;
    TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.dim() == 1 &&
                    slots.size(0) == num_seqs,
                "paged_decode_cpu: slot_mapping must be contiguous int64 [num_seqs]");
    write_rows(*k_new, k_cache, slots.data_ptr<int64_t>(), num_seqs, "k_new");
    write_rows(*v_new, v_cache, slots.data_ptr<int64_t>(), num_seqs, "v_new");
  }
  TORCH_CHECK(threads >= 1 && threads <= 256, "paged_decode_cpu: threads must be in [1, 256], got ", threads);
  const hgw::PagedKV kv{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), k_cache.stride(0), k_cache.stride(1),
                        v_cache.stride(0), v_cache.stride(1), k_cache.size(1), head_dim, static_cast<float>(scale)};
  const Args a{kv, q.data_ptr<float>(), block_tables.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
               out.data_ptr<float>(), num_seqs, num_heads, num_kv_heads, k_cache.size(0), block_tables.size(1),
               hgw::attend_fn(head_dim, portable)};
  decode(a, static_cast<int>(threads));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_cpu", &paged_decode_cpu, "Paged decode attention, float32 CPU (optionally writing new K/V first)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"),
        py::arg("scale"), py::arg("out"), py::arg("k_new") = py::none(), py::arg("v_new") = py::none(),
        py::arg("slot_mapping") = py::none(), py::arg("portable") = false, py::arg("threads") = 1,
        py::call_guard<py::gil_scoped_release>());  // other Python threads (the event loop) run meanwhile
  m.def("has_avx2", [] { return hgw::kHaveAvx2; }, "Whether the build has the AVX2/FMA loops");
}
