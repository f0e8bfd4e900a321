/* Page-delta codec: the record layer of the statesync page stream.
 *
 * docs/stream-format.md is the normative description of the bytes; this file
 * builds and parses the *record payload* of one data block (before LZ4 / after
 * decompression). Framing, compression and checksums of blocks live in
 * src/statesync/stream.py.
 *
 * Records (all integers ULEB128, minimal encoding, at most 10 bytes):
 *   ZERO 0x01  gap count
 *   RAW  0x02  gap count  count*page_size bytes
 *   DUP  0x03  gap count  count * (src_page, hash 16 bytes: lo64 LE, hi64 LE)
 *   XOR  0x04  gap count  count * (dlen, check u64 LE, dlen bytes of XBZRLE delta)
 * first page of a record = expected + gap, where expected is the page after the
 * previous record of the block, or block_min_page for the first record. Pages
 * therefore strictly increase through a block (and, by block_min_page, through
 * a whole stream).
 *
 * XBZRLE delta of d = new XOR old: pairs (zrun, nzrun, nzrun bytes of d),
 * nzrun >= 1, zrun >= 1 except in the first pair, runs never pass page_size,
 * trailing zero bytes are implicit.
 *
 * Every function here is thread-safe on distinct arguments and keeps no state.
 */
#ifndef SS_CODEC_H
#define SS_CODEC_H

#include "ss_common.h"

enum {
    SS_REC_ZERO = 1,
    SS_REC_RAW = 2,
    SS_REC_DUP = 3,
    SS_REC_XOR = 4,
};

/* Encoder options (bit flags). */
#define SS_ENC_DEDUP 1u
#define SS_ENC_XOR 2u

#define SS_ULEB_MAX 10

/* Write v as minimal ULEB128 at out (needs SS_ULEB_MAX bytes of room); returns bytes written. */
size_t ss_uleb_put(uint8_t *out, uint64_t v);

/* Read a minimal ULEB128 from [*p, end). Returns 0 and advances *p, or -EINVAL
 * (truncated, longer than 10 bytes, overflowing 64 bits, or not minimal). */
int ss_uleb_get(const uint8_t **p, const uint8_t *end, uint64_t *v);

/* XBZRLE-style encoding of newp XOR oldp (len bytes each) into out, at most cap
 * bytes. Returns the encoded length (0 for identical pages) or -ENOSPC when the
 * encoding would exceed cap (out then holds garbage up to cap bytes). */
long ss_xor_encode(const uint8_t *newp, const uint8_t *oldp, size_t len, uint8_t *out,
                   size_t cap);

/* Apply an XBZRLE delta of dlen bytes to page (len bytes, holds the old content on
 * entry, the new content on success). Returns 0 or -EINVAL for a malformed delta
 * (page may then be partly modified: callers decode into scratch memory). */
int ss_xor_decode(const uint8_t *delta, size_t dlen, uint8_t *page, size_t len);

/* Dedup table of an encoding session: open addressing over page indices.
 * slots: cap entries (cap a power of two, >= 2 * pages that may be inserted),
 * zero-filled by the caller before the first block. */
typedef struct {
    uint64_t *slots;      /* entry = page index + 1; 0 = empty */
    size_t cap;
} ss_dedup_table;

/* Input of an encoding session: n pages with page numbers pagenos (strictly
 * increasing), contents pages (n * page_size bytes), optionally the receiver's
 * previous contents prev (n * page_size, may be NULL) and prev_ok (n bytes, 1
 * where prev holds the receiver's current content of that page; NULL = all). */
typedef struct {
    size_t page_size;
    size_t n;
    const uint64_t *pagenos;
    const uint8_t *pages;
    const uint8_t *prev;
    const uint8_t *prev_ok;
    uint64_t *hashes;      /* 2*n words of scratch (hashes of pages, lo/hi) */
    uint32_t flags;        /* SS_ENC_* */
    size_t xor_limit;      /* XOR is used when its delta is at most this many bytes */
} ss_enc_input;

/* Encoder statistics, added to by ss_enc_block. */
typedef struct {
    uint64_t records;
    uint64_t pages[5];     /* by record type (index 0 unused) */
    uint64_t dedup_hash_hits_rejected; /* hash equal but memcmp different */
} ss_enc_stats;

/* Worst-case payload bytes for max_pages pages (all RAW, one record each). */
size_t ss_enc_bound(size_t max_pages, size_t page_size);

/* Encode pages [start, start + k) of in into out (cap bytes), k <= max_pages, as
 * records; stops early when the next record would not fit. min_page is the
 * block's first allowed page number (expected for the first gap). Returns the
 * payload length, sets *consumed = k and *nrecords; -EINVAL on bad input
 * (page numbers not increasing / below min_page), -ENOSPC if not even one page fits. */
long ss_enc_block(const ss_enc_input *in, ss_dedup_table *tab, size_t start, size_t max_pages,
                  uint64_t min_page, uint8_t *out, size_t cap, size_t *consumed,
                  size_t *nrecords, ss_enc_stats *st);

/* Parsed page of a data block: what ss_dec_parse hands to ss_dec_build. */
typedef struct {
    uint64_t page;         /* page number */
    uint64_t src;          /* DUP: source page number */
    uint32_t off;          /* RAW: data offset; DUP: hash offset; XOR: delta offset
                            * (payloads are at most UINT32_MAX bytes: ss_dec_parse) */
    uint32_t len;          /* XOR: delta length */
    uint32_t rec;          /* record index within the block */
    uint8_t kind;          /* SS_REC_* */
    uint8_t pad[3];
    uint64_t check;        /* XOR: check word */
} ss_dec_page;

/* Error position reported by the decoder. */
typedef struct {
    size_t offset;         /* payload offset of the bad field */
    size_t record;         /* record index within the block */
    size_t page;           /* index into the parsed pages (build errors) */
} ss_dec_err;

/* Parse a record payload. Fills out[0..*npages) (at most max_pages entries;
 * more pages is an error -E2BIG), *nrecords. All lengths are checked against
 * len; no input value sizes anything. Returns 0, -EINVAL (malformed), -E2BIG
 * (more than max_pages pages, or len > UINT32_MAX: offsets are 32-bit), -ERANGE (page numbers overflow or not increasing,
 * or a page below min_page). err is filled on failure. */
int ss_dec_parse(const uint8_t *buf, size_t len, size_t page_size, uint64_t min_page,
                 size_t max_pages, ss_dec_page *out, size_t *npages, size_t *nrecords,
                 ss_dec_err *err);

/* Build page contents for n parsed pages into outp (n * page_size). On entry,
 * rows of XOR pages hold the receiver's base content and rows of DUP pages whose
 * src_index is < 0 hold the source content; DUP pages with src_index >= 0 copy
 * row src_index (which must be < the page's own index). Verifies every XOR check
 * and DUP hash. Returns 0, -EINVAL (malformed delta / bad src index) or -EBADMSG
 * (a check or hash mismatch: the receiver's base differs from the sender's). */
int ss_dec_build(const uint8_t *buf, size_t len, size_t page_size, const ss_dec_page *pg,
                 size_t n, const int64_t *src_index, uint8_t *outp, ss_dec_err *err);

/* ---- LZ4 frames (liblz4): the block compression of the stream ----------
 * Standard LZ4 frames (any LZ4 frame decoder reads them): independent blocks
 * (at most 4 MiB), content size present, no block checksums; the XXH32 content
 * checksum only when asked for (the stream's block header hashes the stored
 * bytes already). Decoding verifies whatever checksums a frame declares. */

/* Largest frame ss_lz4f_compress can produce for len bytes. */
size_t ss_lz4f_bound(size_t len);

/* Compress len bytes into one frame at dst (cap bytes, >= ss_lz4f_bound(len)).
 * level: 0 fast (default), < 0 faster, 3..12 HC; checksum: add the content
 * checksum. Returns the frame size, or -ENOSPC / -EIO. */
long ss_lz4f_compress(const uint8_t *src, size_t len, uint8_t *dst, size_t cap, int level,
                      int checksum);

/* Decode one complete frame of len bytes into dst (dst_cap >= raw_len bytes),
 * which must come out at exactly raw_len bytes. Never writes past dst_cap
 * whatever the frame says; liblz4 decodes straight into dst (no staging copy)
 * when dst_cap - raw_len is at least the frame's block size (<= 4 MiB), and
 * otherwise buffers at most one frame block itself. Returns 0, -EINVAL
 * (dst_cap < raw_len), -EBADMSG (corrupt, checksum mismatch, longer or shorter
 * than raw_len, bytes after the frame) or -ENOMEM. */
int ss_lz4f_decompress(const uint8_t *src, size_t len, uint8_t *dst, size_t dst_cap,
                       size_t raw_len);

/* Slack after raw_len that lets every valid frame decode without staging. */
#define SS_LZ4F_SLACK ((size_t)4 << 20)

#endif
