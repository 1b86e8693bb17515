// An engine of its own: a torchvision ResNet's stem and first block in plain
// C++, from a reference dump's weights and input, written as a candidate with
// include/resnet_verify/candidate.hpp.
//
//   c++ -std=c++17 -O2 -Iinclude examples/cpp_engine.cpp -o cpp_engine
//   ./cpp_engine REF_DIR OUT_DIR
//   target/release/verify compare REF_DIR OUT_DIR
//
// `verify compare` says succ for the stages written and lists the rest as
// not compared. BatchNorm's eps is torchvision's default, 1e-5.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <limits>
#include <string>

#include "resnet_verify/candidate.hpp"

namespace fs = std::filesystem;

namespace {

// An NCHW tensor.
struct Tensor {
    std::size_t n, c, h, w;
    std::vector<float> data;
    float& at(std::size_t i, std::size_t j, std::size_t y, std::size_t x) { return data[((i * c + j) * h + y) * w + x]; }
    float at(std::size_t i, std::size_t j, std::size_t y, std::size_t x) const {
        return data[((i * c + j) * h + y) * w + x];
    }
    std::vector<std::size_t> shape() const { return {n, c, h, w}; }
};

Tensor zeros(std::size_t n, std::size_t c, std::size_t h, std::size_t w) {
    return {n, c, h, w, std::vector<float>(n * c * h * w, 0.0f)};
}

// torch's conv2d without bias; weight OIHW.
Tensor conv2d(const Tensor& x, const rv::Array& weight, std::size_t stride, std::size_t padding, std::size_t groups) {
    const std::size_t out_c = weight.shape[0], group_c = weight.shape[1], kh = weight.shape[2], kw = weight.shape[3];
    Tensor y = zeros(x.n, out_c, (x.h + 2 * padding - kh) / stride + 1, (x.w + 2 * padding - kw) / stride + 1);
    const std::size_t per_group = out_c / groups;
    for (std::size_t i = 0; i < x.n; ++i)
        for (std::size_t o = 0; o < out_c; ++o)
            for (std::size_t oy = 0; oy < y.h; ++oy)
                for (std::size_t ox = 0; ox < y.w; ++ox) {
                    double sum = 0.0;
                    for (std::size_t k = 0; k < group_c; ++k) {
                        const std::size_t channel = o / per_group * group_c + k;
                        for (std::size_t ky = 0; ky < kh; ++ky)
                            for (std::size_t kx = 0; kx < kw; ++kx) {
                                const long iy = static_cast<long>(oy * stride + ky) - static_cast<long>(padding);
                                const long ix = static_cast<long>(ox * stride + kx) - static_cast<long>(padding);
                                if (iy < 0 || ix < 0 || iy >= static_cast<long>(x.h) || ix >= static_cast<long>(x.w)) continue;
                                sum += static_cast<double>(x.at(i, channel, iy, ix)) *
                                       weight.data[((o * group_c + k) * kh + ky) * kw + kx];
                            }
                    }
                    y.at(i, o, oy, ox) = static_cast<float>(sum);
                }
    return y;
}

// Eval mode: the running statistics.
Tensor batch_norm(Tensor x, const fs::path& weights, const std::string& module, double eps) {
    const auto part = [&](const char* name) { return rv::read_npy(weights / (module + "." + name + ".npy")).data; };
    const auto mean = part("running_mean"), var = part("running_var"), gamma = part("weight"), beta = part("bias");
    for (std::size_t i = 0; i < x.n; ++i)
        for (std::size_t j = 0; j < x.c; ++j)
            for (std::size_t y = 0; y < x.h; ++y)
                for (std::size_t z = 0; z < x.w; ++z) {
                    float& v = x.at(i, j, y, z);
                    v = static_cast<float>((v - mean[j]) / std::sqrt(static_cast<double>(var[j]) + eps) * gamma[j] + beta[j]);
                }
    return x;
}

Tensor relu(Tensor x) {
    for (float& v : x.data) v = std::max(v, 0.0f);
    return x;
}

Tensor add_relu(Tensor x, const Tensor& identity) {
    for (std::size_t k = 0; k < x.data.size(); ++k) x.data[k] = std::max(x.data[k] + identity.data[k], 0.0f);
    return x;
}

Tensor max_pool(const Tensor& x) {  // 3x3, stride 2, padding 1
    Tensor y = zeros(x.n, x.c, (x.h + 2 - 3) / 2 + 1, (x.w + 2 - 3) / 2 + 1);
    for (std::size_t i = 0; i < x.n; ++i)
        for (std::size_t j = 0; j < x.c; ++j)
            for (std::size_t oy = 0; oy < y.h; ++oy)
                for (std::size_t ox = 0; ox < y.w; ++ox) {
                    float best = -std::numeric_limits<float>::infinity();
                    for (std::size_t ky = 0; ky < 3; ++ky)
                        for (std::size_t kx = 0; kx < 3; ++kx) {
                            const long iy = static_cast<long>(oy * 2 + ky) - 1, ix = static_cast<long>(ox * 2 + kx) - 1;
                            if (iy >= 0 && ix >= 0 && iy < static_cast<long>(x.h) && ix < static_cast<long>(x.w))
                                best = std::max(best, x.at(i, j, iy, ix));
                        }
                    y.at(i, j, oy, ox) = best;
                }
    return y;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) {
        std::cerr << "usage: cpp_engine REF_DIR OUT_DIR\n";
        return 2;
    }
    try {
        const fs::path reference = argv[1], weights = reference / "weights";
        const double eps = 1e-5;
        const auto weight = [&](const std::string& name) { return rv::read_npy(weights / (name + ".weight.npy")); };
        const rv::Array input = rv::read_npy(reference / "stages" / "000_input.npy");
        Tensor x{input.shape[0], input.shape[1], input.shape[2], input.shape[3], input.data};

        rv::CandidateWriter writer(argv[2], "NCHW");
        const auto stage = [&](const std::string& name, const char* type, const Tensor& t) {
            writer.stage(name, type, t.shape(), t.data);
            return t;
        };
        // The stem.
        x = stage("conv1", "Conv2d", conv2d(x, weight("conv1"), 2, 3, 1));
        x = stage("bn1", "BatchNorm2d", batch_norm(x, weights, "bn1", eps));
        x = stage("relu", "ReLU", relu(x));
        x = stage("maxpool", "MaxPool2d", max_pool(x));

        // layer1.0: a Bottleneck where the dump has conv3, else a BasicBlock.
        const std::string block = "layer1.0";
        const bool bottleneck = fs::exists(weights / (block + ".conv3.weight.npy"));
        const std::size_t width = weight(block + ".conv2").shape[0];
        const std::size_t groups = bottleneck ? width / weight(block + ".conv2").shape[1] : 1;
        struct Conv { const char* name; std::size_t padding, groups; };
        const std::vector<Conv> convs = bottleneck
            ? std::vector<Conv>{{"conv1", 0, 1}, {"conv2", 1, groups}, {"conv3", 0, 1}}
            : std::vector<Conv>{{"conv1", 1, 1}, {"conv2", 1, 1}};
        Tensor out = x, identity = x;
        for (std::size_t k = 0; k < convs.size(); ++k) {
            const std::string conv = block + "." + convs[k].name, norm = block + ".bn" + std::to_string(k + 1);
            out = stage(conv, "Conv2d", conv2d(out, weight(conv), 1, convs[k].padding, convs[k].groups));
            out = stage(norm, "BatchNorm2d", batch_norm(out, weights, norm, eps));
            if (k + 1 < convs.size()) out = stage(block + ".relu#" + std::to_string(k), "ReLU", relu(out));
        }
        if (fs::exists(weights / (block + ".downsample.0.weight.npy"))) {
            identity = stage(block + ".downsample.0", "Conv2d", conv2d(identity, weight(block + ".downsample.0"), 1, 0, 1));
            identity = stage(block + ".downsample.1", "BatchNorm2d", batch_norm(identity, weights, block + ".downsample.1", eps));
            stage(block + ".downsample", "Sequential", identity);
        }
        out = stage(block + ".relu#" + std::to_string(convs.size() - 1), "ReLU", add_relu(out, identity));
        stage(block, bottleneck ? "Bottleneck" : "BasicBlock", out);
        std::cout << "wrote " << writer.close().string() << "\n";
    } catch (const rv::Error& error) {
        std::cerr << "cpp_engine: " << error.what() << "\n";
        return 1;
    }
    return 0;
}
