// fastsample-run: classifier-guided sampling from a `fastsample export --target aoti`
// directory, without Python: DDIM or ancestral (DDPM) steps.
//
//   fastsample-run EXPORT_DIR --out images.npy [--sampler ddim|ddpm]
//                  [--noise noise.npy | --seed S --batch B [--num-samples N] [--first-index F]]
//                  [--labels 1,2,3 | --labels-npy y.npy] [--scale S] [--eta E] [--raw x.npy]
//   fastsample-run --print-seeds K --seed S --num-samples N [--first-index F]
//
// The loop is the one fastsample's Python sampler runs: DDIM (Song et al. eq. 12; guidance as
// in Dhariwal & Nichol's Algorithm 2) or the ancestral step with the learned variance (Nichol &
// Dhariwal eq. 15; guidance shifts the mean, Algorithm 1), with the same float32 tables,
// gathered from schedule.json's float64 values, and the same operation order, so that given
// the same noise the two agree to the graphs' rounding. The sampler is the export's (its
// recipe's: `fastsample export --recipe`; DDIM for exports made without one) unless --sampler
// names the other. The classifier is called and its gradient applied where schedule.json's
// plan tables for the sampler say (`<sampler>_compute`, `<sampler>_use`): the recipe's
// guidance budget (every k-th step, reusing the last gradient in between; an interval of
// timesteps) and the pipeline's stable guidance (DDIM skips the gradient where
// alpha_bar < ~1e-6). Exports that predate the plan tables: DDIM follows their "guide" table,
// DDPM guides every step. images.npy holds [B, H, W, C] uint8 (truncated like the reference);
// --raw also writes the float32 samples [B, C, H, W].
//
// --seed S draws as `fastsample sample --seed S` does on the same device: sample i (counted from
// --first-index) has its own generator seeded sample_seed(S, i), which draws x_T and then one
// tensor per step; without --labels its label is the one the Python pipeline draws. So sample i
// is the Python sampler's sample i, whatever --batch is. --print-seeds K prints each sample's
// generator seed and drawn label (of K classes) and exits.

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.h"
#include "npy.h"
#include "seeds.h"

namespace fs = fastsample;

namespace {

struct Args {
  std::string dir, out, noise, raw, labels, labels_npy, sampler;
  bool seeded = false;
  uint64_t seed = 0;
  int64_t batch = 0, num_samples = 0, first_index = 0, print_seeds = 0;
  double scale = -1.0, eta = 0.0;
};

[[noreturn]] void usage_error(const std::string& message) {
  throw std::invalid_argument(message);
}

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> rest(argv + 1, argv + argc);
  for (size_t i = 0; i < rest.size(); ++i) {
    const std::string& k = rest[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= rest.size()) usage_error(k + " needs a value");
      return rest[++i];
    };
    auto number = [&]() -> double {
      std::string v = next();
      size_t used = 0;
      double d = 0;
      try {
        d = std::stod(v, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used == 0 || used != v.size()) usage_error(k + " " + v + ": expected a number");
      return d;
    };
    // Seeds are full 64-bit integers, which a double cannot hold.
    auto integer = [&]() -> uint64_t {
      std::string v = next();
      size_t used = 0;
      uint64_t u = 0;
      try {
        if (!v.empty() && v[0] != '-' && v[0] != '+') u = std::stoull(v, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used == 0 || used != v.size()) usage_error(k + " " + v + ": expected a number (0 <= N < 2^64)");
      return u;
    };
    if (k == "--out") a.out = next();
    else if (k == "--sampler") a.sampler = next();
    else if (k == "--noise") a.noise = next();
    else if (k == "--raw") a.raw = next();
    else if (k == "--labels") a.labels = next();
    else if (k == "--labels-npy") a.labels_npy = next();
    else if (k == "--seed") a.seed = integer(), a.seeded = true;
    else if (k == "--batch") a.batch = static_cast<int64_t>(number());
    else if (k == "--num-samples") a.num_samples = static_cast<int64_t>(number());
    else if (k == "--first-index") a.first_index = static_cast<int64_t>(number());
    else if (k == "--print-seeds") a.print_seeds = static_cast<int64_t>(number());
    else if (k == "--scale") a.scale = number();
    else if (k == "--eta") a.eta = number();
    else if (k == "-h" || k == "--help") {
      std::cout << "usage: fastsample-run EXPORT_DIR --out images.npy [--sampler ddim|ddpm] "
                   "[--noise noise.npy | "
                   "--seed S --batch B [--num-samples N] [--first-index F]] [--labels 1,2,3 | "
                   "--labels-npy y.npy] [--scale S] [--eta E] [--raw samples.npy]\n"
                   "       fastsample-run --print-seeds K --seed S --num-samples N [--first-index F]\n";
      std::exit(0);
    } else if (!k.empty() && k[0] == '-') usage_error("unknown option " + k);
    else if (a.dir.empty()) a.dir = k;
    else usage_error("unexpected argument " + k);
  }
  if (a.num_samples < 0 || a.first_index < 0 || a.print_seeds < 0)
    usage_error("--num-samples, --first-index and --print-seeds take non-negative integers");
  if (a.print_seeds > 0) {
    if (!a.seeded || a.num_samples < 1) usage_error("--print-seeds needs --seed S and --num-samples N");
    return a;
  }
  if (a.dir.empty()) usage_error("EXPORT_DIR is required");
  if (a.out.empty()) usage_error("--out is required");
  if (a.noise.empty() == !a.seeded) usage_error("give --noise FILE or --seed N (one of them)");
  if (a.seeded && a.batch < 1) usage_error("--seed needs --batch B (B >= 1)");
  if (!a.seeded && (a.num_samples > 0 || a.first_index > 0))
    usage_error("--num-samples and --first-index go with --seed");
  if (a.eta < 0) usage_error("--eta " + std::to_string(a.eta) + ": expected >= 0");
  if (!a.sampler.empty() && a.sampler != "ddim" && a.sampler != "ddpm")
    usage_error("--sampler " + a.sampler + ": expected ddim or ddpm");
  return a;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error(path + ": cannot open");
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// A float64 JSON table as the float32 tensor Python's sampler gathers.
torch::Tensor table(const fs::json::Value& tables, const std::string& name) {
  std::vector<double> v = tables.at(name).as_numbers();
  return torch::tensor(v, torch::kFloat64).to(torch::kFloat32);
}

struct Graph {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  std::vector<std::string> inputs;
  torch::Tensor operator()(const std::vector<torch::Tensor>& args) {
    auto out = loader->run(args);
    return out.at(0);
  }
};

Graph load_graph(const std::string& dir, const fs::json::Value& entry) {
  Graph g;
  for (const auto& input : entry.at("inputs").array) g.inputs.push_back(input.at("name").as_string());
  g.loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(dir + "/" + entry.at("file").as_string());
  return g;
}

// A fresh generator on `device` seeded like Python's torch.Generator(device).manual_seed(seed).
at::Generator new_generator(const torch::Device& device, uint64_t seed) {
  if (device.is_cpu()) return at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Generator g = at::detail::getCUDAHooks().getNewGenerator(device.has_index() ? device.index() : 0);
  g.set_current_seed(seed);
  return g;
}

// One line per sample: its index, its generator seed and the label of K classes it draws.
int print_seeds(const Args& a) {
  for (int64_t i = a.first_index; i < a.first_index + a.num_samples; ++i)
    std::cout << i << " " << fs::seeds::sample_seed(a.seed, static_cast<uint64_t>(i)) << " "
              << fs::seeds::drawn_label(a.seed, static_cast<uint64_t>(i), a.print_seeds) << "\n";
  return 0;
}

int run(const Args& a) {
  if (a.print_seeds > 0) return print_seeds(a);
  torch::NoGradGuard no_grad;
  const fs::json::Value manifest = fs::json::parse(read_text(a.dir + "/manifest.json"));
  if (manifest.at("target").as_string() != "aoti")
    usage_error(a.dir + " holds a '" + manifest.at("target").as_string() +
                "' export; fastsample-run needs --target aoti");
  if (manifest.at("device").as_string() != "cpu" && !torch::cuda::is_available())
    usage_error(a.dir + " was compiled for " + manifest.at("device").as_string() + "; no such device here");
  torch::Device device(manifest.at("device").as_string() == "cpu" ? torch::kCPU : torch::kCUDA);
  const fs::json::Value schedule = fs::json::parse(read_text(a.dir + "/schedule.json"));
  const auto& diffusion = schedule.at("diffusion");
  const bool learn_sigma = diffusion.at("learn_sigma").as_bool();
  const bool predict_xstart = diffusion.at("predict_xstart").as_bool();
  const bool clip = schedule.at("clip_denoised").as_bool();
  const auto& tables = schedule.at("tables");
  const int64_t n = static_cast<int64_t>(schedule.at("num_steps").as_number());
  // The sampler: --sampler, else the one the export was made for (DDIM before exports said).
  std::string sampler = a.sampler;
  if (sampler.empty()) {
    sampler = "ddim";
    if (schedule.has("sampling")) sampler = schedule.at("sampling").at("sampler").as_string();
    if (sampler != "ddim" && sampler != "ddpm")
      usage_error(a.dir + " was exported for sampler " + sampler +
                  "; fastsample-run runs ddim or ddpm (pass --sampler)");
  }
  const bool ddpm = sampler == "ddpm";
  if (schedule.has("sampling") && schedule.at("sampling").has("cache_interval") &&
      schedule.at("sampling").at("cache_interval").as_number() != 1)
    usage_error(a.dir + " was exported for a recipe that caches features; fastsample-run runs the "
                "whole UNet at every step: export the recipe with cache_interval 1, or run this "
                "export with `fastsample sample --model " + a.dir + "`");
  if (ddpm && a.eta != 0.0) usage_error("--eta is DDIM's; the ancestral (ddpm) step has none");

  const auto& graphs = manifest.at("graphs");
  Graph unet = load_graph(a.dir, graphs.at("unet"));
  const bool guided_export = graphs.has("classifier_grad");
  Graph grad;
  if (guided_export) grad = load_graph(a.dir, graphs.at("classifier_grad"));
  const double scale = a.scale >= 0 ? a.scale : manifest.at("guidance_scale").as_number();
  const bool guided = guided_export && scale != 0.0;
  if (a.scale > 0 && !guided_export) usage_error("--scale: this export has no classifier_grad graph");

  const auto& x_shape = graphs.at("unet").at("inputs").array.at(0).at("shape").array;
  const int64_t C = static_cast<int64_t>(x_shape.at(1).as_number());
  const int64_t H = static_cast<int64_t>(x_shape.at(2).as_number());
  const int64_t W = static_cast<int64_t>(x_shape.at(3).as_number());

  // Explicit noise: x_T then one draw per step, as Python's sample(noise=...) takes it, one batch.
  // Seeds: num_samples samples in batches of B, each drawing from its own generator.
  torch::Tensor noise;
  int64_t B = a.batch, N = a.num_samples > 0 ? a.num_samples : a.batch;
  if (!a.noise.empty()) {
    noise = fs::npy::read(a.noise);
    if (noise.scalar_type() != torch::kFloat32 || noise.dim() != 5 || noise.size(0) < 1 ||
        noise.size(2) != C || noise.size(3) != H || noise.size(4) != W)
      usage_error(a.noise + ": expected float32 noise of shape [steps + 1 or 1, B, " + std::to_string(C) +
                  ", " + std::to_string(H) + ", " + std::to_string(W) + "]");
    if (noise.size(0) != n + 1 && !(noise.size(0) == 1 && a.eta == 0.0 && !ddpm))
      usage_error(a.noise + ": expected " + std::to_string(n + 1) + " draws (x_T and one per step)");
    B = N = noise.size(1);
    noise = noise.to(device);
  }

  // Labels: for a class-conditional model and for the classifier; label i is sample i's.
  const bool needs_y = std::find(unet.inputs.begin(), unet.inputs.end(), "y") != unet.inputs.end() || guided;
  torch::Tensor y;
  if (needs_y) {
    int64_t classes = 0;
    const auto& clf = manifest.at("classifier");
    if (clf.kind == fs::json::Value::Kind::Object)
      classes = static_cast<int64_t>(clf.at("config").at("config").at("out_channels").as_number());
    const auto& mcfg = manifest.at("model").at("config").at("config");
    if (mcfg.has("num_classes") && mcfg.at("num_classes").kind == fs::json::Value::Kind::Number)
      classes = static_cast<int64_t>(mcfg.at("num_classes").as_number());
    std::vector<int64_t> labels;
    if (!a.labels_npy.empty()) {
      torch::Tensor t = fs::npy::read(a.labels_npy);
      if (t.scalar_type() != torch::kInt64 || t.dim() != 1) usage_error(a.labels_npy + ": expected int64 labels [B]");
      labels.assign(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
    } else if (!a.labels.empty()) {
      std::stringstream s(a.labels);
      std::string part;
      std::vector<int64_t> wanted;
      while (std::getline(s, part, ',')) {
        try {
          wanted.push_back(std::stoll(part));
        } catch (const std::exception&) {
          usage_error("--labels " + a.labels + ": expected comma-separated integers");
        }
      }
      // Used in turn from the run's first sample, as the Python pipeline's classes are.
      for (int64_t i = 0; i < N; ++i)
        labels.push_back(wanted.at(static_cast<size_t>(a.first_index + i) % wanted.size()));
    } else if (a.seeded) {
      for (int64_t i = 0; i < N; ++i)
        labels.push_back(fs::seeds::drawn_label(a.seed, static_cast<uint64_t>(a.first_index + i), classes));
    } else {
      for (int64_t i = 0; i < N; ++i) labels.push_back(i % classes);
    }
    if (static_cast<int64_t>(labels.size()) != N)
      usage_error(std::to_string(labels.size()) + " labels for " + std::to_string(N) + " samples");
    for (int64_t l : labels)
      if (l < 0 || l >= classes)
        usage_error("class label " + std::to_string(l) + ": expected 0.." + std::to_string(classes - 1));
    y = torch::tensor(labels, torch::kInt64).to(device);
  }

  // The float32 tables of fastsample.sampler.step_tables and ddim_loop.
  auto f32 = [&](const char* name) { return table(tables, name).to(device); };
  torch::Tensor t_model = f32("t_model");
  torch::Tensor sqrt_recip_ac = f32("sqrt_recip_alphas_cumprod");
  torch::Tensor sqrt_recipm1_ac = f32("sqrt_recipm1_alphas_cumprod");
  torch::Tensor ac = f32("alphas_cumprod");
  torch::Tensor ac_prev = f32("alphas_cumprod_prev");
  torch::Tensor sqrt_one_minus_ac = (1 - ac).sqrt();
  torch::Tensor sigma = a.eta * torch::sqrt((1 - ac_prev) / (1 - ac)) * torch::sqrt(1 - ac / ac_prev);
  torch::Tensor sqrt_ac_prev = torch::sqrt(ac_prev);
  torch::Tensor dir_coef = torch::sqrt((1 - ac_prev - sigma.pow(2)).clamp_min(0));
  // The guidance plan: where the classifier is called (compute) and where a gradient is
  // applied (use; a used step that does not compute reuses the last one).
  std::vector<double> use(n, 1.0), compute(n, 1.0);
  if (tables.has(sampler + "_use")) {
    use = tables.at(sampler + "_use").as_numbers();
    compute = tables.at(sampler + "_compute").as_numbers();
  } else if (!ddpm && tables.has("guide")) {
    use = compute = tables.at("guide").as_numbers();
  }
  if (static_cast<int64_t>(use.size()) != n || static_cast<int64_t>(compute.size()) != n)
    usage_error("schedule.json: a guidance plan of " + std::to_string(use.size()) + " steps for " +
                std::to_string(n) + " steps");
  int64_t classifier_calls = 0;
  for (double c : compute) classifier_calls += c != 0.0;
  // DDPM: the posterior's mean coefficients and log variances (fastsample.sampler.ddpm_tables).
  torch::Tensor coef1, coef2, min_log, max_log, fixed_log_var;
  if (ddpm) {
    coef1 = f32("posterior_mean_coef1");
    coef2 = f32("posterior_mean_coef2");
    min_log = f32("posterior_log_variance_clipped");
    max_log = f32("log_betas");
    fixed_log_var = f32("fixed_large_log_variance");
  }

  // One batch: draw(k) is x_T for k = 0, else step k's fresh noise [b, C, H, W].
  auto run_batch = [&](const std::function<torch::Tensor(int64_t)>& draw, const torch::Tensor& y_b) {
    torch::Tensor x = draw(0);
    torch::Tensor g;  // the last gradient computed (scaled)
    const int64_t b = x.size(0);
    for (int64_t k = 1; k <= n; ++k) {
      const int64_t i = n - k;
      torch::Tensor t = t_model[i].expand({b}).contiguous();
      std::vector<torch::Tensor> args{x, t};
      for (size_t j = 2; j < unet.inputs.size(); ++j) {
        if (unet.inputs[j] == "y") args.push_back(y_b);
        else usage_error("the UNet graph takes '" + unet.inputs[j] + "': fastsample-run samples base models only");
      }
      torch::Tensor out = unet(args);
      if (guided && compute[i] != 0.0) g = grad({x, t, y_b}) * scale;
      const bool apply = guided && use[i] != 0.0 && g.defined();
      torch::Tensor eps_out = learn_sigma ? out.narrow(1, 0, C) : out;
      torch::Tensor x0 = predict_xstart ? eps_out : sqrt_recip_ac[i] * x - sqrt_recipm1_ac[i] * eps_out;
      if (clip) x0 = x0.clamp(-1, 1);
      if (ddpm) {
        torch::Tensor log_var;
        if (learn_sigma) {
          torch::Tensor frac = (out.narrow(1, C, C) + 1) / 2;
          log_var = frac * max_log[i] + (1 - frac) * min_log[i];
        } else {
          log_var = fixed_log_var[i].expand_as(x);
        }
        torch::Tensor mean = coef1[i] * x0 + coef2[i] * x;
        if (apply) mean = mean + torch::exp(log_var) * g;
        // Ancestral sampling draws at every step (the last one's noise goes unused).
        torch::Tensor z = draw(k);
        x = i > 0 ? mean + torch::exp(0.5 * log_var) * z : mean;
        continue;
      }
      if (apply) {
        torch::Tensor eps = (sqrt_recip_ac[i] * x - x0) / sqrt_recipm1_ac[i] - sqrt_one_minus_ac[i] * g;
        x0 = sqrt_recip_ac[i] * x - sqrt_recipm1_ac[i] * eps;
      }
      torch::Tensor eps = (sqrt_recip_ac[i] * x - x0) / sqrt_recipm1_ac[i];
      x = x0 * sqrt_ac_prev[i] + dir_coef[i] * eps;
      // The Python sampler draws at every step; with eta = 0 the draws go unused, and each
      // sample's generator draws nothing after them, so skipping them changes no sample.
      if (a.eta != 0.0) {
        torch::Tensor z = draw(k);
        if (i > 0) x = x + sigma[i] * z;
      }
    }
    return x;
  };

  std::vector<torch::Tensor> batches;
  for (int64_t start = 0; start < N; start += B) {
    const int64_t b = std::min(B, N - start);
    torch::Tensor y_b = needs_y ? y.narrow(0, start, b) : torch::Tensor();
    if (!a.noise.empty()) {
      batches.push_back(run_batch([&](int64_t k) { return noise[k]; }, y_b));
      continue;
    }
    std::vector<at::Generator> gens;
    for (int64_t j = 0; j < b; ++j)
      gens.push_back(new_generator(device, fs::seeds::sample_seed(a.seed, static_cast<uint64_t>(a.first_index + start + j))));
    const auto options = torch::TensorOptions().dtype(torch::kFloat32).device(device);
    batches.push_back(run_batch(
        [&](int64_t) {
          std::vector<torch::Tensor> draws;
          for (auto& g : gens) draws.push_back(torch::randn({C, H, W}, g, options));
          return torch::stack(draws);
        },
        y_b));
  }
  torch::Tensor x = torch::cat(batches);
  torch::Tensor images = ((x + 1) * 127.5).clamp(0, 255).to(torch::kUInt8).permute({0, 2, 3, 1}).contiguous();
  fs::npy::write(a.out, images);
  if (!a.raw.empty()) fs::npy::write(a.raw, x.to(torch::kCPU));
  std::ostringstream how;
  how << n << (ddpm ? " DDPM" : " DDIM") << " steps";
  if (guided) how << ", guidance scale " << scale << ", classifier at " << classifier_calls << " of them";
  std::cout << "wrote " << N << " images to " << a.out << " (" << how.str() << ")\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const std::invalid_argument& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
