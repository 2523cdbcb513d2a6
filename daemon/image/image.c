/* Loading firmware images (protocols.md §15.1, §15.2, §7.4): copy the
 * caller's bytes into a sealed memfd, recognise ELF, UF2, Intel HEX or raw
 * .bin by content, turn the loadable bytes into sorted, merged segments and
 * find the compressed (zlib or bzip2) Klipper data dictionary inside them.  Every
 * input is treated as hostile: all lengths and offsets are checked before
 * use and failures come back as -EBADMSG with a message for a person.
 * Nothing here knows about MCUs, bootloaders or flash layouts (check.c). */
#include <elf.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <json-c/json.h>

#include "image/image.h"
#include "shared/time-util.h"

#define UF2_MAGIC_START0 0x0A324655u
#define UF2_MAGIC_START1 0x9E5D5157u
#define UF2_MAGIC_END 0x0AB16F30u
#define UF2_FLAG_NOT_MAIN_FLASH 0x00000001u
#define UF2_FLAG_FILE_CONTAINER 0x00001000u
#define UF2_FLAG_FAMILY_ID 0x00002000u
#define UF2_BLOCK_SIZE 512
#define UF2_MAX_PAYLOAD 476

#define IMAGE_FLAT_MAX ((uint64_t) 256 * 1024 * 1024)
#define COPY_BUFFER_SIZE (64 * 1024)
/* Candidates (a "78 DA" that starts something inflating to '{', or a bzip2
 * stream header) that are fully decompressed and parsed before giving up;
 * real images have one. */
#define DICT_MAX_ATTEMPTS 256

/* A piece of loadable data before merging: points into the mapping. */
struct chunk {
        uint64_t address;
        size_t size;
        const uint8_t *data;
};

struct chunk_list {
        struct chunk *chunks;
        size_t n, allocated;
        uint64_t payload;       /* bytes in all chunks */
};

static int set_message(char **ret_message, const char *fmt, ...) _printf_(2, 3);
static int set_message(char **ret_message, const char *fmt, ...) {
        va_list ap;
        char *m;
        int r;

        if (!ret_message)
                return -EBADMSG;
        va_start(ap, fmt);
        r = vasprintf(&m, fmt, ap);
        va_end(ap);
        if (r < 0)
                return -ENOMEM;
        free(*ret_message);
        *ret_message = m;
        return -EBADMSG;
}

static uint32_t read_le32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}


const char *image_format_to_string(enum image_format format) {
        switch (format) {
        case IMAGE_FORMAT_BIN:
                return "bin";
        case IMAGE_FORMAT_ELF:
                return "ELF";
        case IMAGE_FORMAT_HEX:
                return "Intel HEX";
        case IMAGE_FORMAT_UF2:
                return "UF2";
        }
        return "unknown";
}

struct image *image_free(struct image *img) {
        if (!img)
                return NULL;

        for (size_t i = 0; i < img->n_segments; i++)
                free(img->segments[i].allocated);
        free(img->segments);
        klipper_dict_free(img->dict);
        if (img->map)
                munmap((void *) img->map, img->file_size);
        safe_close(img->fd);
        free(img);
        return NULL;
}

/* Add @size bytes at @address.  A piece that continues the previous one in
 * both address and memory (consecutive Intel HEX records) extends it, so a
 * file of many tiny records costs one entry.  Refuses more than
 * IMAGE_MAX_CHUNKS separate pieces and more than IMAGE_MAX_PAYLOAD bytes in
 * all (ELF program headers may point at the same bytes many times). */
static int chunk_add(struct image *img, struct chunk_list *l, uint64_t address, const uint8_t *data, size_t size,
                     char **ret_message) {
        struct chunk *last = l->n > 0 ? &l->chunks[l->n - 1] : NULL;

        if (size == 0)
                return 0;
        if (size > IMAGE_MAX_PAYLOAD || l->payload + size > IMAGE_MAX_PAYLOAD)
                return set_message(ret_message, "%s image holds more than %u bytes of data",
                                   image_format_to_string(img->format), (unsigned) IMAGE_MAX_PAYLOAD);
        l->payload += size;
        if (last && last->address + last->size == address && last->data + last->size == data) {
                last->size += size;
                return 0;
        }
        if (l->n >= IMAGE_MAX_CHUNKS)
                return set_message(ret_message, "%s image is split into more than %u separate pieces of data",
                                   image_format_to_string(img->format), (unsigned) IMAGE_MAX_CHUNKS);
        if (l->n == l->allocated) {
                size_t n = MAX(l->allocated * 2, (size_t) 64);
                struct chunk *p = reallocarray(l->chunks, n, sizeof(*p));

                if (!p)
                        return -ENOMEM;
                l->chunks = p;
                l->allocated = n;
        }
        l->chunks[l->n++] = (struct chunk) { .address = address, .size = size, .data = data };
        return 0;
}

static void chunk_list_done(struct chunk_list *l) {
        free(l->chunks);
}

static int chunk_compare(const void *a, const void *b) {
        const struct chunk *x = a, *y = b;

        return x->address < y->address ? -1 : x->address > y->address ? 1 : 0;
}

/* Sort the chunks, refuse overlaps and addresses beyond 32 bits, and merge
 * adjacent chunks into segments with their own copy of the bytes. */
static int chunks_to_segments(struct image *img, struct chunk_list *l, char **ret_message) {
        size_t i = 0, n_segments = 1;

        if (l->n == 0)
                return set_message(ret_message, "%s image contains no data",
                                   image_format_to_string(img->format));

        qsort(l->chunks, l->n, sizeof(struct chunk), chunk_compare);
        for (size_t k = 0; k < l->n; k++) {
                if (l->chunks[k].address + l->chunks[k].size > UINT64_C(0x100000000))
                        return set_message(ret_message, "%s image has data beyond 4 GiB at 0x%" PRIx64,
                                           image_format_to_string(img->format), l->chunks[k].address);
                if (k > 0 && l->chunks[k].address < l->chunks[k - 1].address + l->chunks[k - 1].size)
                        return set_message(ret_message, "%s image has overlapping data at 0x%08" PRIx64,
                                           image_format_to_string(img->format), l->chunks[k].address);
                if (k > 0 && l->chunks[k].address != l->chunks[k - 1].address + l->chunks[k - 1].size)
                        n_segments++;
        }
        if (n_segments > IMAGE_MAX_SEGMENTS)
                return set_message(ret_message, "%s image has %zu separate address ranges; at most %u are "
                                   "accepted", image_format_to_string(img->format), n_segments,
                                   (unsigned) IMAGE_MAX_SEGMENTS);

        img->segments = calloc(n_segments, sizeof(struct image_segment));
        if (!img->segments)
                return -ENOMEM;

        while (i < l->n) {
                struct image_segment *s = &img->segments[img->n_segments];
                size_t j = i, size = 0, pos = 0;

                /* Extend the run while the next chunk starts where this one ends. */
                size = l->chunks[i].size;
                while (j + 1 < l->n && l->chunks[j + 1].address == l->chunks[j].address + l->chunks[j].size) {
                        j++;
                        size += l->chunks[j].size;
                }

                s->allocated = malloc(size);
                if (!s->allocated)
                        return -ENOMEM;
                for (size_t k = i; k <= j; k++) {
                        memcpy(s->allocated + pos, l->chunks[k].data, l->chunks[k].size);
                        pos += l->chunks[k].size;
                }
                s->address = l->chunks[i].address;
                s->size = size;
                s->data = s->allocated;
                img->n_segments++;
                i = j + 1;
        }
        return 0;
}

static int parse_bin(struct image *img, const uint8_t *p, size_t len);

const char *image_elf_machine_name(uint16_t machine) {
        switch (machine) {
        case EM_386:
                return "i386";
        case EM_X86_64:
                return "x86-64";
        case EM_AARCH64:
                return "AArch64";
        case EM_ARM:
                return "ARM";
        case EM_AVR:
                return "AVR";
        case EM_RISCV:
                return "RISC-V";
        case EM_MIPS:
                return "MIPS";
        case EM_PPC:
                return "PowerPC";
        case EM_PPC64:
                return "PowerPC64";
        case EM_XTENSA:
                return "Xtensa";
        case EM_SPARC:
                return "SPARC";
        case EM_S390:
                return "S/390";
        case 258: /* EM_LOONGARCH */
                return "LoongArch";
        default:
                return NULL;
        }
}

/* The microcontrollers Klipper builds 32-bit ELF files for. */
static bool elf_machine_is_mcu(uint16_t machine) {
        return machine == EM_ARM || machine == EM_AVR || machine == EM_RISCV;
}

/* The fields of an ELF header that decide how to read the file, in host
 * order, for either class and byte order. */
struct elf_info {
        bool is_64, is_msb;
        uint16_t type, machine, phentsize, phnum;
        uint64_t phoff;
};

static uint64_t elf_read(const struct elf_info *e, const uint8_t *p, unsigned size) {
        uint64_t v = 0;

        for (unsigned i = 0; i < size; i++)
                v |= (uint64_t) p[e->is_msb ? size - 1 - i : i] << (8 * i);
        return v;
}

/* A program header: p_type, p_offset, p_filesz. */
static void elf_read_phdr(const struct elf_info *e, const uint8_t *ph, uint32_t *type, uint64_t *offset,
                          uint64_t *filesz) {
        *type = (uint32_t) elf_read(e, ph, 4);
        *offset = e->is_64 ? elf_read(e, ph + 8, 8) : elf_read(e, ph + 4, 4);
        *filesz = e->is_64 ? elf_read(e, ph + 32, 8) : elf_read(e, ph + 16, 4);
}

/* A program for a Linux host (Klipper's "linux" build, klipper_mcu): it is
 * installed as a file, not written to flash, so the image is the whole file
 * as one segment at 0; the program headers are only checked to lie inside
 * it (a truncated download must not be installed). */
static int parse_host_elf(struct image *img, const struct elf_info *e, const uint8_t *p, size_t len,
                          char **ret_message) {
        for (unsigned i = 0; i < e->phnum; i++) {
                uint64_t offset, filesz;
                uint32_t type;

                elf_read_phdr(e, p + e->phoff + (size_t) i * e->phentsize, &type, &offset, &filesz);
                if (type == PT_INTERP)
                        img->host_dynamic = true;
                if (type != PT_LOAD && type != PT_INTERP && type != PT_DYNAMIC)
                        continue;
                if (offset > len || filesz > len - offset)
                        return set_message(ret_message,
                                           "truncated ELF file: segment %u (%" PRIu64 " bytes at offset %" PRIu64
                                           ") lies beyond its end (%zu bytes)", i, filesz, offset, len);
        }
        img->host_program = true;
        return parse_bin(img, p, len);
}

/* Where the loadable contents of a firmware PT_LOAD segment begin: ld puts
 * the ELF and program headers into the first segment when they fit in
 * front of the first section in its page (an application linked at
 * 0x08000800, say), but they are no firmware — objcopy -O binary, which
 * makes klipper.bin, takes the allocated sections only.  So the first
 * allocated section with contents inside [@offset, @offset + @filesz)
 * decides; without section headers the whole segment counts. */
static uint64_t elf32_segment_contents(const uint8_t *p, size_t len, uint64_t offset, uint64_t filesz) {
        Elf32_Ehdr eh;
        uint64_t first = UINT64_MAX;

        memcpy(&eh, p, sizeof(eh));
        if (eh.e_shoff == 0 || eh.e_shentsize < sizeof(Elf32_Shdr) || eh.e_shoff > len ||
            (uint64_t) eh.e_shnum * eh.e_shentsize > len - eh.e_shoff)
                return offset;
        for (unsigned i = 0; i < eh.e_shnum; i++) {
                Elf32_Shdr sh;

                memcpy(&sh, p + eh.e_shoff + (size_t) i * eh.e_shentsize, sizeof(sh));
                if (!(sh.sh_flags & SHF_ALLOC) || sh.sh_type == SHT_NOBITS || sh.sh_size == 0)
                        continue;
                if (sh.sh_offset >= offset && sh.sh_offset < offset + filesz)
                        first = MIN(first, (uint64_t) sh.sh_offset);
        }
        return first == UINT64_MAX ? offset : first;
}

static int parse_elf(struct image *img, const uint8_t *p, size_t len, char **ret_message) {
        _cleanup_(chunk_list_done) struct chunk_list l = {};
        struct elf_info e = {};
        bool has_interp = false;
        const char *name;
        int r;

        if (len < EI_NIDENT + 4)
                return set_message(ret_message, "truncated ELF file (%zu bytes)", len);
        if ((p[EI_CLASS] != ELFCLASS32 && p[EI_CLASS] != ELFCLASS64) ||
            (p[EI_DATA] != ELFDATA2LSB && p[EI_DATA] != ELFDATA2MSB))
                return set_message(ret_message, "corrupt ELF file (class %u, data encoding %u)", p[EI_CLASS],
                                   p[EI_DATA]);
        e.is_64 = p[EI_CLASS] == ELFCLASS64;
        e.is_msb = p[EI_DATA] == ELFDATA2MSB;
        if (len < (e.is_64 ? sizeof(Elf64_Ehdr) : sizeof(Elf32_Ehdr)))
                return set_message(ret_message, "truncated ELF file (%zu bytes)", len);
        e.type = (uint16_t) elf_read(&e, p + 16, 2);
        e.machine = (uint16_t) elf_read(&e, p + 18, 2);
        e.phoff = e.is_64 ? elf_read(&e, p + 32, 8) : elf_read(&e, p + 28, 4);
        e.phentsize = (uint16_t) elf_read(&e, p + (e.is_64 ? 54 : 42), 2);
        e.phnum = (uint16_t) elf_read(&e, p + (e.is_64 ? 56 : 44), 2);
        img->elf_machine = e.machine;
        img->elf_64 = e.is_64;

        name = image_elf_machine_name(e.machine);
        if (!name && !elf_machine_is_mcu(e.machine))
                return set_message(ret_message, "ELF for an unknown machine (e_machine %u)", e.machine);
        if (e.type != ET_EXEC && e.type != ET_DYN)
                return set_message(ret_message, "ELF file is not an executable (e_type %u)", e.type);
        if (e.phnum == 0)
                return set_message(ret_message, "ELF file has no program headers");
        if (e.phentsize < (e.is_64 ? sizeof(Elf64_Phdr) : sizeof(Elf32_Phdr)))
                return set_message(ret_message, "ELF file has a bad program header size (%u)", e.phentsize);
        if (e.phoff > len || (uint64_t) e.phnum * e.phentsize > len - e.phoff)
                return set_message(ret_message, "truncated ELF file: program headers beyond its end");

        /* Firmware for a microcontroller is a static 32-bit little-endian
         * executable for one of its machines; anything else (64-bit, PIE,
         * an interpreter, another machine) is a program for a Linux host. */
        for (unsigned i = 0; i < e.phnum; i++) {
                uint64_t offset, filesz;
                uint32_t type;

                elf_read_phdr(&e, p + e.phoff + (size_t) i * e.phentsize, &type, &offset, &filesz);
                has_interp = has_interp || type == PT_INTERP;
        }
        if (e.is_64 || e.is_msb || e.type != ET_EXEC || has_interp || !elf_machine_is_mcu(e.machine))
                return parse_host_elf(img, &e, p, len, ret_message);

        for (unsigned i = 0; i < e.phnum; i++) {
                Elf32_Phdr ph;
                uint64_t skip;

                memcpy(&ph, p + e.phoff + (size_t) i * e.phentsize, sizeof(ph));
                if (ph.p_type != PT_LOAD || ph.p_filesz == 0)
                        continue;
                if (ph.p_offset > len || ph.p_filesz > len - ph.p_offset)
                        return set_message(ret_message,
                                           "truncated ELF file: segment %u (0x%08" PRIx32 ", %" PRIu32
                                           " bytes) lies beyond its end", i, ph.p_paddr, ph.p_filesz);
                /* The load address (LMA), like objcopy -O binary. */
                skip = elf32_segment_contents(p, len, ph.p_offset, ph.p_filesz) - ph.p_offset;
                r = chunk_add(img, &l, ph.p_paddr + skip, p + ph.p_offset + skip, ph.p_filesz - skip,
                              ret_message);
                if (r < 0)
                        return r;
        }
        return chunks_to_segments(img, &l, ret_message);
}

static int hex_digit(uint8_t c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        return -1;
}

/* True when the file starts like Intel HEX: ':' and a record header of
 * hex digits (a .bin starting with ':' and ten hex digits does not exist). */
static bool looks_like_hex(const uint8_t *p, size_t len) {
        if (len < 11 || p[0] != ':')
                return false;
        for (size_t i = 1; i < 11; i++)
                if (hex_digit(p[i]) < 0)
                        return false;
        return true;
}

/* Intel HEX (protocols.md §15.1): records 00 data, 01 end of file,
 * 02 extended segment address, 04 extended linear address; 03 and 05 (start
 * address) are accepted and ignored.  Data bytes are decoded into one buffer
 * that the chunks point into. */
static int parse_hex(struct image *img, const uint8_t *p, size_t len, char **ret_message) {
        _cleanup_(chunk_list_done) struct chunk_list l = {};
        _cleanup_free_ uint8_t *decoded = NULL;
        uint64_t base = 0;
        size_t pos = 0, out = 0;
        unsigned line = 1;
        bool eof = false;
        int r;

        /* Every data byte takes two characters, so len / 2 always suffices. */
        decoded = malloc(len / 2 + 1);
        if (!decoded)
                return -ENOMEM;

        while (pos < len) {
                uint8_t record[5 + 255];
                size_t end, n_chars, count, sum = 0;
                unsigned type, offset;

                /* Blank lines and line ends are skipped. */
                if (p[pos] == '\r' || p[pos] == '\n' || p[pos] == ' ' || p[pos] == '\t') {
                        if (p[pos] == '\n')
                                line++;
                        pos++;
                        continue;
                }
                if (eof)
                        return set_message(ret_message, "corrupt Intel HEX at line %u: data after the end-of-file record", line);
                if (p[pos] != ':')
                        return set_message(ret_message, "corrupt Intel HEX at line %u: line does not start with ':'", line);

                end = pos + 1;
                while (end < len && p[end] != '\r' && p[end] != '\n')
                        end++;
                n_chars = end - pos - 1;
                if (n_chars < 10) {
                        if (end == len)
                                return set_message(ret_message, "truncated Intel HEX at line %u", line);
                        return set_message(ret_message, "corrupt Intel HEX at line %u: record too short", line);
                }
                if (n_chars % 2 != 0 && end == len)
                        return set_message(ret_message, "truncated Intel HEX at line %u", line);
                if (n_chars % 2 != 0 || n_chars / 2 > sizeof(record))
                        return set_message(ret_message, "corrupt Intel HEX at line %u: bad record length", line);
                for (size_t i = 0; i < n_chars / 2; i++) {
                        int hi = hex_digit(p[pos + 1 + 2 * i]), lo = hex_digit(p[pos + 2 + 2 * i]);

                        if (hi < 0 || lo < 0)
                                return set_message(ret_message, "corrupt Intel HEX at line %u: not a hex digit", line);
                        record[i] = (uint8_t) (hi << 4 | lo);
                        sum += record[i];
                }
                count = record[0];
                if (n_chars / 2 < count + 5) {
                        if (end == len)
                                return set_message(ret_message, "truncated Intel HEX at line %u", line);
                        return set_message(ret_message, "corrupt Intel HEX at line %u: record shorter than its length", line);
                }
                if (n_chars / 2 > count + 5)
                        return set_message(ret_message, "corrupt Intel HEX at line %u: record longer than its length", line);
                if ((sum & 0xff) != 0)
                        return set_message(ret_message, "corrupt Intel HEX at line %u: checksum mismatch", line);

                offset = (unsigned) record[1] << 8 | record[2];
                type = record[3];
                switch (type) {
                case 0x00:
                        memcpy(decoded + out, record + 4, count);
                        r = chunk_add(img, &l, base + offset, decoded + out, count, ret_message);
                        if (r < 0)
                                return r;
                        out += count;
                        break;
                case 0x01:
                        eof = true;
                        break;
                case 0x02:
                case 0x04:
                        if (count != 2)
                                return set_message(ret_message, "corrupt Intel HEX at line %u: bad address record", line);
                        base = (uint64_t) ((unsigned) record[4] << 8 | record[5]) << (type == 0x02 ? 4 : 16);
                        break;
                case 0x03:
                case 0x05:
                        break;
                default:
                        return set_message(ret_message, "corrupt Intel HEX at line %u: unknown record type %02x", line, type);
                }
                pos = end;
        }
        if (!eof)
                return set_message(ret_message, "truncated Intel HEX at line %u: no end-of-file record", line);

        return chunks_to_segments(img, &l, ret_message);
}

/* UF2 (protocols.md §7.4): 512-byte blocks numbered 0..numBlocks-1, all of
 * one family; blocks flagged "not main flash" are skipped. */
static int parse_uf2(struct image *img, const uint8_t *p, size_t len, char **ret_message) {
        _cleanup_(chunk_list_done) struct chunk_list l = {};
        size_t n_blocks;
        uint32_t num_blocks = 0;

        if (len % UF2_BLOCK_SIZE != 0)
                return set_message(ret_message, "truncated UF2: %zu bytes is not a whole number of 512-byte blocks", len);
        n_blocks = len / UF2_BLOCK_SIZE;

        for (size_t i = 0; i < n_blocks; i++) {
                const uint8_t *b = p + i * UF2_BLOCK_SIZE;
                uint32_t flags = read_le32(b + 8), address = read_le32(b + 12), payload = read_le32(b + 16);
                uint32_t block_no = read_le32(b + 20), total = read_le32(b + 24), family = read_le32(b + 28);
                int r;

                if (read_le32(b) != UF2_MAGIC_START0 || read_le32(b + 4) != UF2_MAGIC_START1 ||
                    read_le32(b + 508) != UF2_MAGIC_END)
                        return set_message(ret_message, "corrupt UF2: block %zu has a wrong magic number", i);
                if (flags & UF2_FLAG_FILE_CONTAINER)
                        return set_message(ret_message, "UF2 file containers are not firmware images");
                if (i == 0)
                        num_blocks = total;
                if (block_no != i || total != num_blocks || total != n_blocks)
                        return set_message(ret_message,
                                           "corrupt UF2: block %zu says it is block %" PRIu32 " of %" PRIu32
                                           " (the file has %zu blocks)", i, block_no, total, n_blocks);
                if (flags & UF2_FLAG_FAMILY_ID) {
                        if (img->has_uf2_family && img->uf2_family != family)
                                return set_message(ret_message,
                                                   "UF2 mixes families 0x%08" PRIx32 " and 0x%08" PRIx32,
                                                   img->uf2_family, family);
                        img->has_uf2_family = true;
                        img->uf2_family = family;
                }
                if (flags & UF2_FLAG_NOT_MAIN_FLASH)
                        continue;
                if (payload == 0 || payload > UF2_MAX_PAYLOAD)
                        return set_message(ret_message, "corrupt UF2: block %zu has a payload of %" PRIu32 " bytes",
                                           i, payload);
                r = chunk_add(img, &l, address, b + 32, payload, ret_message);
                if (r < 0)
                        return r;
        }
        return chunks_to_segments(img, &l, ret_message);
}

static int parse_bin(struct image *img, const uint8_t *p, size_t len) {
        img->segments = calloc(1, sizeof(struct image_segment));
        if (!img->segments)
                return -ENOMEM;
        img->segments[0] = (struct image_segment) { .address = 0, .size = len, .data = p };
        img->n_segments = 1;
        return 0;
}

static void inflate_endp(z_stream *z) {
        inflateEnd(z);
}

/* Cheap test before a full parse: does the stream at @p inflate to text
 * starting with '{'? */
static bool inflates_to_json_object(const uint8_t *p, size_t len) {
        _cleanup_(inflate_endp) z_stream z = {};
        uint8_t out[32];
        int r;

        if (inflateInit(&z) != Z_OK)
                return false;
        z.next_in = (Bytef *) p;
        z.avail_in = (uInt) MIN(len, (size_t) 4096);
        z.next_out = out;
        z.avail_out = sizeof(out);
        r = inflate(&z, Z_SYNC_FLUSH);
        if (r != Z_OK && r != Z_STREAM_END && r != Z_BUF_ERROR)
                return false;
        for (size_t i = 0; i < sizeof(out) - z.avail_out; i++) {
                if (out[i] == ' ' || out[i] == '\n' || out[i] == '\r' || out[i] == '\t')
                        continue;
                return out[i] == '{';
        }
        return false;
}

/* protocols.md §15.2: try every place a zlib ("78 DA") or bzip2 stream may
 * start in every segment. */
static int find_dictionary(struct image *img) {
        unsigned attempts = 0;

        for (size_t s = 0; s < img->n_segments; s++) {
                const uint8_t *data = img->segments[s].data;
                size_t size = img->segments[s].size;

                for (size_t i = klipper_dict_find_stream(data, size, 0); i < size;
                     i = klipper_dict_find_stream(data, size, i + 1)) {
                        _cleanup_(klipper_dict_freep) struct klipper_dict *d = NULL;
                        int r;

                        /* A bzip2 magic is ten bytes long and rarely there by
                         * chance; a zlib one is cheap to test first. */
                        if (data[i] == 0x78 && !inflates_to_json_object(data + i, size - i))
                                continue;
                        if (++attempts > DICT_MAX_ATTEMPTS)
                                return 0;

                        r = klipper_dict_parse_compressed(data + i, size - i, IMAGE_DICT_MAX_SIZE, &d);
                        if (r == -ENOMEM)
                                return r;
                        if (r < 0)
                                continue;
                        if (klipper_dict_app_is_klipper(d->app) || (!d->app && d->has_commands)) {
                                img->dict = TAKE_PTR(d);
                                return 0;
                        }
                }
        }
        return 0;
}

static int image_parse(struct image *img, char **ret_message) {
        const uint8_t *p = img->map;
        size_t len = img->file_size;
        int r;

        if (len >= 4 && memcmp(p, ELFMAG, SELFMAG) == 0) {
                img->format = IMAGE_FORMAT_ELF;
                r = parse_elf(img, p, len, ret_message);
        } else if (len >= 4 && read_le32(p) == UF2_MAGIC_START0) {
                img->format = IMAGE_FORMAT_UF2;
                r = parse_uf2(img, p, len, ret_message);
        } else if (looks_like_hex(p, len)) {
                img->format = IMAGE_FORMAT_HEX;
                r = parse_hex(img, p, len, ret_message);
        } else {
                img->format = IMAGE_FORMAT_BIN;
                r = parse_bin(img, p, len);
        }
        if (r < 0)
                return r;

        img->has_addresses = img->format != IMAGE_FORMAT_BIN;
        img->lowest_address = img->segments[0].address;
        img->total_size = img->segments[img->n_segments - 1].address + img->segments[img->n_segments - 1].size -
                          img->lowest_address;
        for (size_t i = 0; i < img->n_segments; i++)
                img->data_size += img->segments[i].size;

        return find_dictionary(img);
}

static int write_all(int fd, const uint8_t *p, size_t len) {
        while (len > 0) {
                ssize_t n = write(fd, p, len);

                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                p += n;
                len -= (size_t) n;
        }
        return 0;
}

/* What an fd that is not a regular file is, for the refusal. */
static const char *fd_kind(mode_t mode) {
        switch (mode & S_IFMT) {
        case S_IFDIR:
                return "a directory";
        case S_IFIFO:
                return "a pipe";
        case S_IFSOCK:
                return "a socket";
        case S_IFCHR:
                return "a character device";
        case S_IFBLK:
                return "a block device";
        case S_IFLNK:
                return "a symbolic link";
        default:
                return "a special file (an eventfd or similar)";
        }
}

/* Only a regular file (a memfd is one) open for reading, and no larger
 * than @max_size by its size: nothing else is read at all. */
static int check_image_fd(int fd, size_t max_size, struct stat *st, char **ret_message) {
        int flags;

        flags = fcntl(fd, F_GETFL);
        if (flags < 0)
                return -errno;
        if (fstat(fd, st) < 0)
                return -errno;
        if (!S_ISREG(st->st_mode)) {
                set_message(ret_message, "the image fd is %s, not a regular file; pass the image file itself",
                            fd_kind(st->st_mode));
                return -EBADF;
        }
        if ((flags & O_PATH) || (flags & O_ACCMODE) == O_WRONLY) {
                set_message(ret_message, "the image fd is not open for reading");
                return -EBADF;
        }
        if (st->st_size < 0 || (uint64_t) st->st_size > max_size) {
                set_message(ret_message, "the image file is %lld bytes; at most %zu bytes are accepted",
                            (long long) st->st_size, max_size);
                return -EFBIG;
        }
        return 0;
}

/* Copy st_size bytes from offset 0 of @fd into @dest; the file must neither
 * shrink nor grow meanwhile, and the copy gives up at @deadline. */
static int copy_image_fd(int fd, int dest, size_t size, uint64_t deadline, char **ret_message) {
        _cleanup_free_ uint8_t *buf = malloc(COPY_BUFFER_SIZE);
        size_t done = 0;
        ssize_t n;
        int r;

        if (!buf)
                return -ENOMEM;
        while (done < size) {
                if (now_usec() > deadline) {
                        set_message(ret_message, "reading the image took too long (%zu of %zu bytes read)", done,
                                    size);
                        return -ETIMEDOUT;
                }
                n = pread(fd, buf, MIN((size_t) COPY_BUFFER_SIZE, size - done), (off_t) done);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        r = -errno;
                        set_message(ret_message, "cannot read the image file: %s", strerror(-r));
                        return r;
                }
                if (n == 0) {
                        set_message(ret_message, "the image file shrank while it was read (%zu of %zu bytes); "
                                    "pass a file nobody is writing", done, size);
                        return -EBADMSG;
                }
                r = write_all(dest, buf, (size_t) n);
                if (r < 0)
                        return r;
                done += (size_t) n;
        }
        /* Something beyond the size it had: it is still being written. */
        do
                n = pread(fd, buf, 1, (off_t) size);
        while (n < 0 && errno == EINTR);
        if (n > 0) {
                set_message(ret_message, "the image file grew while it was read (beyond %zu bytes); "
                            "pass a file nobody is writing", size);
                return -EBADMSG;
        }
        return 0;
}

/* Copy @fd (or @data when @fd < 0) into a new memfd, seal and map it. */
static int image_new(int fd, const void *data, size_t len, size_t max_size, uint64_t timeout_usec,
                     struct image **ret, char **ret_message) {
        _cleanup_(image_freep) struct image *img = NULL;
        uint64_t total = 0, deadline = now_usec() + timeout_usec;
        void *map;
        int r;

        img = calloc(1, sizeof(*img));
        if (!img)
                return -ENOMEM;
        img->fd = -1;

        if (fd >= 0) {
                struct stat st;

                r = check_image_fd(fd, max_size, &st, ret_message);
                if (r < 0)
                        return r;
                len = (size_t) st.st_size;
        }
        if (len == 0) {
                set_message(ret_message, "image is empty");
                return -ENODATA;
        }

        img->fd = memfd_create("mcuflashd-image", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (img->fd < 0)
                return -errno;
        if (fd < 0)
                r = write_all(img->fd, data, len);
        else
                r = copy_image_fd(fd, img->fd, len, deadline, ret_message);
        if (r < 0)
                return r;
        total = len;

        if (fcntl(img->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0)
                return -errno;
        map = mmap(NULL, total, PROT_READ, MAP_SHARED, img->fd, 0);
        if (map == MAP_FAILED)
                return -errno;
        img->map = map;
        img->file_size = total;

        r = image_parse(img, ret_message);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(img);
        return 0;
}

int image_load_fd(int fd, size_t max_size, uint64_t timeout_usec, struct image **ret, char **ret_message) {
        if (fd < 0 || !ret)
                return -EINVAL;
        return image_new(fd, NULL, 0, max_size, timeout_usec, ret, ret_message);
}

int image_load_memory(const void *data, size_t len, struct image **ret, char **ret_message) {
        if ((!data && len > 0) || !ret)
                return -EINVAL;
        return image_new(-1, data, len, len, 0, ret, ret_message);
}

int image_flat(const struct image *img, uint64_t base, uint8_t **ret, size_t *ret_len) {
        const struct image_segment *last;
        uint64_t end;
        uint8_t *buf;

        if (!img || !ret || !ret_len || img->n_segments == 0)
                return -EINVAL;
        if (base > img->segments[0].address)
                return -ERANGE;
        last = &img->segments[img->n_segments - 1];
        end = last->address + last->size;
        if (end - base > IMAGE_FLAT_MAX)
                return -EFBIG;

        buf = malloc(end - base);
        if (!buf)
                return -ENOMEM;
        memset(buf, 0xff, end - base);
        for (size_t i = 0; i < img->n_segments; i++)
                memcpy(buf + (img->segments[i].address - base), img->segments[i].data, img->segments[i].size);
        *ret = buf;
        *ret_len = end - base;
        return 0;
}
