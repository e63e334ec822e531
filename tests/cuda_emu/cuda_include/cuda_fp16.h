// CPU emulator stand-in for the CUDA header (tests/cuda_emu).
#pragma once
#include "emu_cuda.h"
