// The emulator's side of the kernel registry (kernels/common/registry.h): the list the
// kernel files fill at static-initialisation time, and the C entry points the Rust side reads
// and launches through.
#include "emu.h"

#include <cstdio>
#include <cstring>
#include <vector>

#include "../common/registry.h"

namespace {
struct Registered {
    PaKernelInfo info;
    emu::EntryLauncher launcher;
};

// A function-local static: registration runs during other files' static initialisation, in
// an order the language leaves open.
std::vector<Registered>& registry() {
    static std::vector<Registered> list;
    return list;
}

const Registered* find(const char* name) {
    for (const Registered& r : registry()) {
        if (strcmp(r.info.name, name) == 0) return &r;
    }
    return nullptr;
}
}  // namespace

namespace emu {
int register_kernel(const PaKernelInfo& info, EntryLauncher launcher) {
    registry().push_back(Registered{info, launcher});
    return static_cast<int>(registry().size()) - 1;
}
}  // namespace emu

// Number of registered kernel entries.
extern "C" size_t pa_kernel_count() { return registry().size(); }

// Entry i of the registry (nullptr past the end). The strings are static.
extern "C" const PaKernelInfo* pa_kernel_info(size_t i) {
    return i < registry().size() ? &registry()[i].info : nullptr;
}

// Launches a registered entry on the emulator. params_size must be the entry's parameter
// struct size and, for a kernel written for a fixed block size, threads must be that size:
// a plan that disagrees with the kernel is an error, never a silent misuse.
extern "C" int pa_emu_launch(const char* name, const void* params, size_t params_size, unsigned gx, unsigned gy,
                             unsigned gz, unsigned threads, size_t smem_bytes, char* err, size_t err_len) {
    const Registered* r = find(name);
    if (r == nullptr) {
        snprintf(err, err_len, "no kernel named %s in the registry", name);
        return 1;
    }
    if (params_size != r->info.params_size) {
        snprintf(err, err_len, "%s: parameter struct of %zu bytes, the kernel takes %zu", name, params_size,
                 r->info.params_size);
        return 1;
    }
    if (r->info.threads != 0 && threads != static_cast<unsigned>(r->info.threads)) {
        snprintf(err, err_len, "%s: launched with %u threads, the kernel is written for %d", name, threads,
                 r->info.threads);
        return 1;
    }
    if (smem_bytes < static_cast<size_t>(r->info.smem_bytes)) {
        snprintf(err, err_len, "%s: launched with %zu bytes of dynamic shared memory, the kernel needs %d", name,
                 smem_bytes, r->info.smem_bytes);
        return 1;
    }
    return r->launcher(params, dim3(gx, gy, gz), dim3(threads, 1, 1), smem_bytes, err, err_len);
}
