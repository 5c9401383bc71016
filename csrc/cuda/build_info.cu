// Facts about the device code of this binary, for `segops info`.
#include <cuda_runtime_api.h>

#include <string>

#define SEGOPS_STR2(x) #x
#define SEGOPS_STR(x) SEGOPS_STR2(x)

namespace segops {

std::string cuda_build_info() {
  std::string s = "cuda_archs=";
#ifdef __CUDA_ARCH_LIST__
  s += SEGOPS_STR(__CUDA_ARCH_LIST__);  // e.g. "800,900", set by nvcc for the host pass too
#endif
  s += ";cuda_runtime=" SEGOPS_STR(CUDART_VERSION) ";";
  return s;
}

}  // namespace segops
