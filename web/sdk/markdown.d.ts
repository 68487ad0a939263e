/** Escape text for HTML element content and double-quoted attribute values. */
export function escapeHtml(text: string): string;

/** Whether `url` may be a link target: absolute http(s) only. */
export function isSafeUrl(url: string): boolean;

/** Render Markdown to an HTML string that is safe to assign to `innerHTML`. */
export function renderMarkdown(source: string | null | undefined): string;

/** Render inline Markdown (code, bold, italic, links) of one line to safe HTML. */
export function renderInline(text: string, allowLinks?: boolean): string;
