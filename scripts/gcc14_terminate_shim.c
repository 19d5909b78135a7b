/* llama-cpp-cffi's prebuilt CPU library was linked by GCC 14, whose code calls
 * __cxa_call_terminate when an exception leaves a noexcept function; older libstdc++ (GCC 12 on
 * Debian 12) lacks that one symbol. Same contract as GCC 14's: the program terminates. Built by
 * `make check-gguf` and loaded before the library; it is never part of mathtune itself. */
#include <stdlib.h>

void __cxa_call_terminate(void *unwind_exception) {
    (void)unwind_exception;
    abort();
}
