// Reading and writing NumPy .npy files (format 1.0/2.0, little-endian, C order) as tensors.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastsample::npy {

inline std::string header_field(const std::string& header, const std::string& key) {
  auto at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error("npy header without '" + key + "'");
  auto colon = header.find(':', at);
  auto start = header.find_first_not_of(' ', colon + 1);
  if (header[start] == '(') return header.substr(start, header.find(')', start) - start + 1);
  if (header[start] == '\'') return header.substr(start + 1, header.find('\'', start + 1) - start - 1);
  return header.substr(start, header.find_first_of(",}", start) - start);
}

inline torch::Tensor read(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open");
  char magic[8];
  f.read(magic, 8);
  if (!f || std::string(magic, 6) != "\x93NUMPY") throw std::runtime_error(path + ": not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t n = 0;
    f.read(reinterpret_cast<char*>(&n), 2);
    header_len = n;
  } else {
    f.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, '\0');
  f.read(header.data(), header_len);
  std::string descr = header_field(header, "descr");
  if (header_field(header, "fortran_order") != "False")
    throw std::runtime_error(path + ": Fortran-ordered arrays are not read");
  std::vector<int64_t> shape;
  std::string dims = header_field(header, "shape");
  for (size_t i = 1; i < dims.size();) {
    size_t end = dims.find_first_of(",)", i);
    std::string part = dims.substr(i, end - i);
    if (part.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(part));
    i = end + 1;
  }
  torch::ScalarType type;
  if (descr == "<f4") type = torch::kFloat32;
  else if (descr == "<i8") type = torch::kInt64;
  else if (descr == "|u1") type = torch::kUInt8;
  else throw std::runtime_error(path + ": dtype " + descr + " (expected float32, int64 or uint8)");
  torch::Tensor out = torch::empty(shape, torch::TensorOptions().dtype(type));
  f.read(static_cast<char*>(out.data_ptr()), static_cast<std::streamsize>(out.nbytes()));
  if (!f) throw std::runtime_error(path + ": truncated data");
  return out;
}

// Writes to path + ".tmp", then renames: readers never see a partial file.
inline void write(const std::string& path, const torch::Tensor& tensor) {
  torch::Tensor t = tensor.contiguous().cpu();
  std::string descr;
  if (t.scalar_type() == torch::kUInt8) descr = "|u1";
  else if (t.scalar_type() == torch::kFloat32) descr = "<f4";
  else if (t.scalar_type() == torch::kInt64) descr = "<i8";
  else throw std::runtime_error("npy::write: unsupported dtype");
  std::string shape = "(";
  for (int64_t d : t.sizes()) shape += std::to_string(d) + ", ";
  if (t.dim() > 0) shape.erase(shape.size() - (t.dim() == 1 ? 1 : 2));
  shape += ")";
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw std::runtime_error(path + ": cannot write");
    f.write("\x93NUMPY\x01\x00", 8);
    uint16_t n = static_cast<uint16_t>(header.size());
    f.write(reinterpret_cast<const char*>(&n), 2);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    f.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
    if (!f) throw std::runtime_error(path + ": write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error(path + ": rename failed");
}

}  // namespace fastsample::npy
