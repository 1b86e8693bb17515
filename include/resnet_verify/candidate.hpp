// resnet_verify/candidate.hpp: write an engine's stage outputs as a candidate
// dump, for `verify compare REF_DIR CAND_DIR` (docs/dump-format.md). One
// header, C++17, no dependency:
//
//   #include "resnet_verify/candidate.hpp"
//
//   rv::CandidateWriter writer("out/my-engine", "NCHW");
//   writer.stage("conv1", "Conv2d", {1, 64, 112, 112}, conv1_output);  // float32, C order
//   writer.stage("layer1.0.relu#1", "ReLU", {1, 64, 56, 56}, block_output);
//   writer.close();  // writes manifest.json
//
// Stage names are the reference's (`resnet_verify.stage_names(REF_DIR)` lists
// them, `layer1.0.relu#2` for a module's third call); `verify compare`
// checks them, compares each stage written and lists the rest as not
// compared. The .npy files are byte for byte what numpy.save writes.
// rv::read_npy reads a reference's float32 weights and input.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace rv {

/// Bad use of the writer or a file that cannot be written or read; the
/// message names the stage or file and the problem.
class Error : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

namespace detail {

inline bool little_endian() {
    const std::uint16_t one = 1;
    unsigned char first = 0;
    std::memcpy(&first, &one, 1);
    return first == 1;
}

inline std::string shape_text(const std::vector<std::size_t>& shape, const char* open, const char* close) {
    std::string text = open;
    for (std::size_t i = 0; i < shape.size(); ++i) {
        text += (i ? ", " : "") + std::to_string(shape[i]);
    }
    if (shape.size() == 1 && std::string(open) == "(") {
        text += ",";  // a Python 1-tuple
    }
    return text + close;
}

/// The .npy (format 1.0) header numpy.save writes for a C-order float32
/// array of `shape`: the dict, 21 - len(str(shape[0])) spaces kept for
/// growth, then spaces and a newline to a multiple of 64 bytes.
inline std::string npy_header(const std::vector<std::size_t>& shape) {
    std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape_text(shape, "(", ")") + ", }";
    if (!shape.empty()) {
        dict += std::string(21 - std::to_string(shape[0]).size(), ' ');
    }
    const std::size_t prefix = 6 + 2 + 2;  // magic, version, header length
    const std::size_t padding = 64 - (prefix + dict.size() + 1) % 64;
    dict += std::string(padding, ' ') + "\n";
    if (dict.size() > 0xFFFF) {
        throw Error("shape " + shape_text(shape, "[", "]") + ": too many axes for a .npy header");
    }
    std::string header = "\x93NUMPY";
    header += '\x01';
    header += '\x00';
    header += static_cast<char>(dict.size() & 0xFF);
    header += static_cast<char>(dict.size() >> 8);
    return header + dict;
}

/// The number of elements of `shape`, refused where it overflows.
inline std::size_t element_count(const std::vector<std::size_t>& shape, const std::string& what) {
    std::size_t count = 1;
    for (const std::size_t dim : shape) {
        if (dim != 0 && count > SIZE_MAX / dim) {
            throw Error(what + ": shape " + shape_text(shape, "[", "]") + " has more elements than memory can hold");
        }
        count *= dim;
    }
    return count;
}

inline std::string json_string(const std::string& text) {
    std::string quoted = "\"";
    for (const char c : text) {
        if (c == '"' || c == '\\') {
            quoted += '\\';
            quoted += c;
        } else if (static_cast<unsigned char>(c) < 0x20) {
            char escaped[8];
            std::snprintf(escaped, sizeof escaped, "\\u%04x", static_cast<unsigned>(c));
            quoted += escaped;
        } else {
            quoted += c;
        }
    }
    return quoted + "\"";
}

}  // namespace detail

/// Writes `count` float32 values of `shape` (C order) to `path` as numpy.save would.
inline void write_npy(const std::filesystem::path& path, const std::vector<std::size_t>& shape, const float* data,
                      std::size_t count) {
    std::ofstream file(path, std::ios::binary);
    if (!file) {
        throw Error(path.string() + ": cannot be created");
    }
    const std::string header = detail::npy_header(shape);
    file.write(header.data(), static_cast<std::streamsize>(header.size()));
    if (detail::little_endian()) {
        file.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * sizeof(float)));
    } else {
        for (std::size_t i = 0; i < count; ++i) {
            char bytes[4];
            std::memcpy(bytes, data + i, 4);
            const char swapped[4] = {bytes[3], bytes[2], bytes[1], bytes[0]};
            file.write(swapped, 4);
        }
    }
    if (!file) {
        throw Error(path.string() + ": write failed");
    }
}

/// A float32 array read from a .npy file.
struct Array {
    std::vector<std::size_t> shape;
    std::vector<float> data;
};

/// Reads a little-endian float32 C-order .npy file (a dump's weights and
/// stages); anything else is refused, naming the file.
inline Array read_npy(const std::filesystem::path& path) {
    std::ifstream file(path, std::ios::binary);
    if (!file) {
        throw Error(path.string() + ": cannot be opened");
    }
    const std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) {
        throw Error(path.string() + ": not a .npy file");
    }
    const int major = static_cast<unsigned char>(bytes[6]);
    const std::size_t length_bytes = major == 1 ? 2 : 4;
    std::size_t header_length = 0;
    for (std::size_t i = 0; i < length_bytes; ++i) {
        header_length |= static_cast<std::size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    }
    const std::size_t start = 8 + length_bytes;
    if (bytes.size() < start + header_length) {
        throw Error(path.string() + ": truncated header");
    }
    const std::string header = bytes.substr(start, header_length);
    if (header.find("'descr': '<f4'") == std::string::npos || header.find("'fortran_order': False") == std::string::npos) {
        throw Error(path.string() + ": not a little-endian float32 C-order array: " + header);
    }
    Array array;
    const std::size_t open = header.find('(', header.find("'shape'"));
    const std::size_t close = header.find(')', open);
    std::stringstream dims(header.substr(open + 1, close - open - 1));
    std::string dim;
    while (std::getline(dims, dim, ',')) {
        if (dim.find_first_not_of(' ') != std::string::npos) {
            try {
                array.shape.push_back(std::stoul(dim));
            } catch (const std::exception&) {
                throw Error(path.string() + ": unreadable shape in header: " + header);
            }
        }
    }
    const std::size_t count = detail::element_count(array.shape, path.string());
    if (count > bytes.size() / sizeof(float)) {
        throw Error(path.string() + ": the data is shorter than the header's " + detail::shape_text(array.shape, "[", "]"));
    }
    if (bytes.size() != start + header_length + count * sizeof(float)) {
        throw Error(path.string() + ": the data is not the header's " + detail::shape_text(array.shape, "[", "]"));
    }
    array.data.resize(count);
    std::memcpy(array.data.data(), bytes.data() + start + header_length, count * sizeof(float));
    if (!detail::little_endian()) {
        for (float& value : array.data) {
            char b[4];
            std::memcpy(b, &value, 4);
            const char swapped[4] = {b[3], b[2], b[1], b[0]};
            std::memcpy(&value, swapped, 4);
        }
    }
    return array;
}

/// Writes a candidate dump: `stage()` for each stage the engine computes,
/// then `close()`, which writes the manifest (a writer not closed leaves
/// none: the compare refuses a directory without one).
class CandidateWriter {
  public:
    /// `layout`: "NCHW" (torch's), or "NHWC" for 4-D stages stored
    /// channels-last. A directory that exists must hold nothing but a
    /// candidate written before (it is replaced).
    explicit CandidateWriter(std::filesystem::path out_dir, std::string layout = "NCHW")
        : out_dir_(std::move(out_dir)), layout_(std::move(layout)) {
        if (layout_ != "NCHW" && layout_ != "NHWC") {
            throw Error("layout \"" + layout_ + "\": NCHW or NHWC");
        }
        namespace fs = std::filesystem;
        // Only a candidate written before (a manifest and its stages) is
        // replaced: never a reference (it has weights/), never anything else.
        if (fs::exists(out_dir_)) {
            const bool has_manifest = fs::exists(out_dir_ / "manifest.json");
            for (const auto& entry : fs::directory_iterator(out_dir_)) {
                const std::string name = entry.path().filename().string();
                if ((name != "manifest.json" && name != "stages") || !has_manifest) {
                    throw Error(out_dir_.string() + ": holds " + name +
                                ", so it is not a candidate written before; refusing to overwrite it");
                }
            }
            fs::remove_all(out_dir_ / "stages");
            fs::remove(out_dir_ / "manifest.json");
        }
        fs::create_directories(out_dir_ / "stages");
    }

    /// Writes one stage's output: `shape` as stored (NCHW, or NHWC for a
    /// 4-D stage under layout "NHWC"), `data` its values in C order.
    void stage(const std::string& name, const std::string& module_type, const std::vector<std::size_t>& shape,
               const float* data, std::size_t count) {
        if (closed_) {
            throw Error("stage \"" + name + "\": the writer for " + out_dir_.string() + " is closed");
        }
        if (name.empty() || name.find_first_of("/\\") != std::string::npos) {
            throw Error("stage \"" + name + "\": not a stage name (the reference's, such as layer1.0.relu#1)");
        }
        if (module_type.empty()) {
            throw Error("stage \"" + name + "\": no module type (the torch class: Conv2d, BatchNorm2d, ReLU, ...)");
        }
        for (const Entry& entry : entries_) {
            if (entry.name == name) {
                throw Error("stage \"" + name + "\": written already");
            }
        }
        const std::size_t expected = detail::element_count(shape, "stage \"" + name + "\"");
        if (expected != count) {
            throw Error("stage \"" + name + "\": shape " + detail::shape_text(shape, "[", "]") + " holds " +
                        std::to_string(expected) + " values; the data has " + std::to_string(count));
        }
        std::string file_name = name;
        for (char& c : file_name) {
            c = c == '#' ? '@' : c;
        }
        std::string number = std::to_string(entries_.size());
        number.insert(0, number.size() < 3 ? 3 - number.size() : 0, '0');
        const std::string file = "stages/" + number + "_" + file_name + ".npy";
        write_npy(out_dir_ / file, shape, data, count);
        entries_.push_back({name, module_type, shape, file});
    }

    void stage(const std::string& name, const std::string& module_type, const std::vector<std::size_t>& shape,
               const std::vector<float>& data) {
        stage(name, module_type, shape, data.data(), data.size());
    }

    /// Any other element type is refused where it is written.
    template <typename T>
    void stage(const std::string&, const std::string&, const std::vector<std::size_t>&, const std::vector<T>&) {
        static_assert(std::is_same_v<T, float>,
                      "rv::CandidateWriter stores float32: convert the data to std::vector<float>");
    }

    /// Writes manifest.json; returns the candidate's directory.
    std::filesystem::path close() {
        if (closed_) {
            return out_dir_;
        }
        std::string json = "{\n \"format\": \"resnet-verify-dump\",\n \"schema_version\": 1,\n";
        json += " \"producer\": {\"tool\": \"rv::CandidateWriter (C++)\"},\n \"mode\": \"eval\",\n";
        json += " \"layout\": " + detail::json_string(layout_) + ",\n \"stages\": [";
        for (std::size_t i = 0; i < entries_.size(); ++i) {
            const Entry& e = entries_[i];
            json += std::string(i ? "," : "") + "\n  {\"name\": " + detail::json_string(e.name) +
                    ", \"module_type\": " + detail::json_string(e.module_type) +
                    ", \"shape\": " + detail::shape_text(e.shape, "[", "]") +
                    ", \"file\": " + detail::json_string(e.file) + "}";
        }
        json += "\n ]\n}\n";
        std::ofstream manifest(out_dir_ / "manifest.json", std::ios::binary);
        manifest << json;
        if (!manifest) {
            throw Error((out_dir_ / "manifest.json").string() + ": write failed");
        }
        closed_ = true;
        return out_dir_;
    }

  private:
    struct Entry {
        std::string name;
        std::string module_type;
        std::vector<std::size_t> shape;
        std::string file;
    };
    std::filesystem::path out_dir_;
    std::string layout_;
    std::vector<Entry> entries_;
    bool closed_ = false;
};

}  // namespace rv
