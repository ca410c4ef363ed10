// Empty stand-in for CUDA's header when kernels/bert.cu is compiled for the host (see shim.h).
#pragma once
