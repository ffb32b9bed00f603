"""The page's words: the Indonesian and English texts, `tr` to look one up, the language helpers, the examples."""

from __future__ import annotations

from typing import Any

LANGUAGES = ("id", "en")
DEFAULT_LANGUAGE = "id"
LANGUAGE_CHOICES = [("Bahasa Indonesia", "id"), ("English", "en")]

# Example prompts in Indonesian, Javanese and Sundanese; the spec's three are among them.
EXAMPLES: list[tuple[str, str]] = [
    ("jv", "Sopo wae sing ana ing Punakawan?"),
    ("jv", "Ceritakne babagan sejarah Jawa"),
    ("jv", "Jelasne luwih rinci"),
    ("id", "Apa saja tempat wisata menarik di Bandung?"),
    ("id", "Jelaskan cara membuat nasi goreng yang enak."),
    ("su", "Naon waé kadaharan has Sunda?"),
    ("su", "Jelaskeun naon ari wayang golék."),
]
EXAMPLE_LANGUAGE_NAMES = {"id": "Indonesia", "jv": "Jawa", "su": "Sunda"}

TEXTS: dict[str, dict[str, str]] = {
    "id": {
        "title": "Sahabat-AI Chat",
        "subtitle": "Asisten percakapan berbahasa Indonesia, Jawa dan Sunda.",
        "model": "Model",
        "quantization": "Kuantisasi",
        "device": "Perangkat",
        "context": "Konteks",
        "tokens": "token",
        "demo_note": (
            "**Mode demo:** di mesin ini tidak ada GPU, jadi yang menjawab adalah model kecil bawaan "
            "(SmolLM2-135M), **bukan sahabat-ai**. Jawabannya jauh lebih lemah, terutama dalam bahasa "
            "Indonesia, Jawa dan Sunda."
        ),
        "loading": "⏳ **Model sedang dimuat…** Halaman ini diperbarui otomatis setelah model siap.",
        "load_failed": "❌ **Model gagal dimuat.** Hubungi pengelola layanan. Detail: {reason}",
        "stopping": "⏸ **Layanan sedang dimatikan.** Coba lagi nanti.",
        "upstream_down": (
            "⏳ **Server model belum bisa dihubungi.** Halaman ini diperbarui otomatis setelah tersambung. "
            "Detail: {reason}"
        ),
        "language": "Bahasa / Language",
        "chatbot": "Percakapan",
        "placeholder": "Tulis pesan di bawah atau pilih salah satu contoh. Jawaban muncul kata demi kata.",
        "message": "Pesan",
        "message_placeholder": "Tulis pesan… (Enter untuk kirim, Shift+Enter untuk baris baru)",
        "send": "Kirim",
        "stop": "⏹ Berhenti",
        "retry": "🔄 Coba lagi",
        "undo": "↩️ Urungkan",
        "clear": "🗑️ Hapus percakapan",
        "examples": "Contoh pertanyaan (klik untuk memakai)",
        "settings": "⚙️ Pengaturan",
        "system": "Pesan sistem",
        "system_info": "Instruksi untuk model di awal percakapan. Kosongkan untuk tanpa pesan sistem.",
        "max_new_tokens": "Maks. token baru",
        "max_new_tokens_info": "Panjang maksimum jawaban, dalam token.",
        "temperature": "Temperatur",
        "temperature_info": "0 = selalu memilih kata paling mungkin; makin tinggi makin acak.",
        "top_p": "Top-p",
        "top_p_info": "Ambil sampel dari kata-kata teratas yang total peluangnya p. 1 = mati.",
        "top_k": "Top-k",
        "top_k_info": "Ambil sampel hanya dari k kata paling mungkin. 0 = mati.",
        "repetition_penalty": "Penalti pengulangan",
        "repetition_penalty_info": "Di atas 1 mengurangi pengulangan. 1 = mati.",
        "seed": "Seed",
        "seed_info": "Seed dan pesan yang sama memberi jawaban yang sama. Kosongkan untuk acak.",
        "footer": (
            "Percakapan dan pengaturan disimpan di peramban ini saja (tidak di server). "
            "Jawaban model bisa keliru; periksa kembali informasi penting."
        ),
        "stats_title": "📊 {tokens} token · TTFT {ttft} · {rate} token/dtk",
        "stats_detail": (
            "- Token dihasilkan: **{tokens}** (token prompt: {prompt})\n"
            "- Waktu sampai token pertama (TTFT): **{ttft}**\n"
            "- Durasi total: {duration}; kecepatan rata-rata {rate} token/dtk "
            "(setelah token pertama: {decode_rate} token/dtk)\n"
            "- Selesai karena: {finish}"
        ),
        "finish_stop": "model selesai menjawab",
        "finish_length": "batas maks. token baru tercapai",
        "seconds": "{value} dtk",
        "not_available": "t/a",
        "stopped_title": "⏹ Dihentikan",
        "stopped_detail": "Jawaban dihentikan sebelum selesai; statistik tidak tersedia.",
        "trimmed_title": "ℹ️ {count} giliran terlama tidak dikirim ke model",
        "trimmed_detail": "Percakapan terlalu panjang untuk konteks model, jadi giliran terlama dilewati.",
        "error_title": "⚠️ {summary}",
        "busy": "Server sedang sibuk",
        "busy_detail": "Terlalu banyak permintaan saat ini. Coba lagi dalam {seconds} detik (tombol Coba lagi).",
        "not_ready": "Model belum siap",
        "not_ready_loading": "Model sedang dimuat. Tunggu sebentar lalu tekan Coba lagi.",
        "not_ready_failed": "Model gagal dimuat, jadi layanan belum bisa menjawab. Hubungi pengelola layanan.",
        "not_ready_stopping": "Layanan sedang dimatikan. Coba lagi nanti.",
        "not_ready_unavailable": "Server model belum bisa dihubungi. Tunggu sebentar lalu tekan Coba lagi.",
        "too_long": "Pesan terlalu panjang",
        "too_long_detail": (
            "Pesan ini ({prompt} token) ditambah maks. token baru ({max_new}) melebihi konteks model "
            "({context} token). Persingkat pesan atau kurangi maks. token baru."
        ),
        "invalid": "Permintaan tidak valid",
        "invalid_detail": "Model menolak permintaan ini: {detail}",
        "failed": "Gagal membuat jawaban",
        "failed_detail": "Terjadi kesalahan di server saat membuat jawaban ({detail}). Tekan Coba lagi.",
        "unexpected": "Terjadi kesalahan tak terduga",
        "unexpected_detail": "Kesalahan ini sudah dicatat di server. Tekan Coba lagi.",
    },
    "en": {
        "title": "Sahabat-AI Chat",
        "subtitle": "A chat assistant for Indonesian, Javanese and Sundanese.",
        "model": "Model",
        "quantization": "Quantization",
        "device": "Device",
        "context": "Context",
        "tokens": "tokens",
        "demo_note": (
            "**Demo mode:** there is no GPU on this machine, so the small embedded model (SmolLM2-135M) "
            "answers, **not sahabat-ai**. Its answers are much weaker, especially in Indonesian, "
            "Javanese and Sundanese."
        ),
        "loading": "⏳ **Loading the model…** This page updates by itself once the model is ready.",
        "load_failed": "❌ **The model failed to load.** Contact the service operator. Details: {reason}",
        "stopping": "⏸ **The service is shutting down.** Try again later.",
        "upstream_down": (
            "⏳ **The model server cannot be reached.** This page updates by itself once it is back. Details: {reason}"
        ),
        "language": "Bahasa / Language",
        "chatbot": "Conversation",
        "placeholder": "Type a message below or pick an example. The reply appears word by word.",
        "message": "Message",
        "message_placeholder": "Type a message… (Enter to send, Shift+Enter for a new line)",
        "send": "Send",
        "stop": "⏹ Stop",
        "retry": "🔄 Retry",
        "undo": "↩️ Undo",
        "clear": "🗑️ Clear conversation",
        "examples": "Example questions (click to use)",
        "settings": "⚙️ Settings",
        "system": "System message",
        "system_info": "Instructions for the model at the start of the conversation. Empty for none.",
        "max_new_tokens": "Max new tokens",
        "max_new_tokens_info": "Longest reply, in tokens.",
        "temperature": "Temperature",
        "temperature_info": "0 always picks the most likely word; higher is more random.",
        "top_p": "Top-p",
        "top_p_info": "Sample from the top words whose probabilities add up to p. 1 = off.",
        "top_k": "Top-k",
        "top_k_info": "Sample only from the k most likely words. 0 = off.",
        "repetition_penalty": "Repetition penalty",
        "repetition_penalty_info": "Above 1 discourages repeats. 1 = off.",
        "seed": "Seed",
        "seed_info": "The same seed and message give the same reply. Empty for random.",
        "footer": (
            "The conversation and settings are stored in this browser only (not on the server). "
            "The model can be wrong; double-check important information."
        ),
        "stats_title": "📊 {tokens} tokens · TTFT {ttft} · {rate} tokens/s",
        "stats_detail": (
            "- Tokens generated: **{tokens}** (prompt tokens: {prompt})\n"
            "- Time to first token (TTFT): **{ttft}**\n"
            "- Total duration: {duration}; average speed {rate} tokens/s "
            "(after the first token: {decode_rate} tokens/s)\n"
            "- Finished because: {finish}"
        ),
        "finish_stop": "the model finished its answer",
        "finish_length": "the max new tokens limit was reached",
        "seconds": "{value} s",
        "not_available": "n/a",
        "stopped_title": "⏹ Stopped",
        "stopped_detail": "The reply was stopped before it finished; no stats are available.",
        "trimmed_title": "ℹ️ The {count} oldest turns were not sent to the model",
        "trimmed_detail": "The conversation is too long for the model's context, so the oldest turns were left out.",
        "error_title": "⚠️ {summary}",
        "busy": "The server is busy",
        "busy_detail": "Too many requests right now. Try again in {seconds} seconds (Retry button).",
        "not_ready": "The model is not ready",
        "not_ready_loading": "The model is still loading. Wait a moment, then press Retry.",
        "not_ready_failed": "The model failed to load, so the service cannot answer. Contact the service operator.",
        "not_ready_stopping": "The service is shutting down. Try again later.",
        "not_ready_unavailable": "The model server cannot be reached. Wait a moment, then press Retry.",
        "too_long": "The message is too long",
        "too_long_detail": (
            "This message ({prompt} tokens) plus max new tokens ({max_new}) exceeds the model's context "
            "({context} tokens). Shorten the message or lower max new tokens."
        ),
        "invalid": "Invalid request",
        "invalid_detail": "The model rejected this request: {detail}",
        "failed": "The reply could not be generated",
        "failed_detail": "The server hit an error while generating ({detail}). Press Retry.",
        "unexpected": "An unexpected error occurred",
        "unexpected_detail": "It has been logged on the server. Press Retry.",
    },
}


def language_of(value: Any) -> str:
    return value if value in LANGUAGES else DEFAULT_LANGUAGE


def tr(lang: str, key: str, **values: Any) -> str:
    text = TEXTS[language_of(lang)][key]
    return text.format(**values) if values else text


def format_number(lang: str, value: float, digits: int) -> str:
    """`value` with `digits` decimals and the language's decimal mark (a comma in Indonesian)."""
    text = f"{value:.{digits}f}"
    return text.replace(".", ",") if language_of(lang) == "id" else text
