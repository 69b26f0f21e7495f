"""What the decoder reads (`DecoderInputs`): its prompt's token ids around the prefix, inside the chat template where
the tokenizer has one, the captions' ids, and the rows of [template | prefix | prompt | caption] laid out left-padded."""
from __future__ import annotations

import torch


class DecoderInputs:
    """The inputs of one decoder and its tokenizer (`MultimodalLLM` builds one whenever either changes)."""

    PREFIX_MARK = "\x00prefix\x00"  # where the prefix goes inside the chat template (never tokenized)

    def __init__(self, tokenizer, decoder):
        self.tokenizer, self.decoder = tokenizer, decoder
        self._prompt_ids = {}

    def prompt_ids(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids before and after the prefix: with a chat template, the user turn holds prefix + prompt."""
        if prompt not in self._prompt_ids:
            tok = self.tokenizer
            if tok.chat_template:
                text = tok.apply_chat_template([{"role": "user", "content": self.PREFIX_MARK + prompt}],
                                               tokenize=False, add_generation_prompt=True)
                before, after = text.split(self.PREFIX_MARK)
            else:
                before, after = "", prompt
            self._prompt_ids[prompt] = tuple(torch.tensor(tok(t, add_special_tokens=False).input_ids, dtype=torch.long)
                                             for t in (before, after))
        return self._prompt_ids[prompt]

    def caption_ids(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption ids + EOS, right-padded, and their mask, from lengths: EOS is learned even if pad == eos."""
        rows = [ids + [self.tokenizer.eos_token_id]
                for ids in self.tokenizer(list(captions), add_special_tokens=False).input_ids]
        lengths = torch.tensor([len(r) for r in rows])
        ids = torch.full((len(rows), int(lengths.max())), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
        return ids.to(device), mask.to(device)

    def assemble(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, prompt: str, captions=None,
                 new_tokens: int = 0) -> dict[str, torch.Tensor]:
        """[template head | prefix | prompt, template tail | caption, EOS] → left-padded decoder inputs.

        Every part is laid out at full width with a mask; a stable sort then moves each row's real
        positions to the right, in order, so rows with shorter prefixes or captions are left-padded.
        Labels are -100 everywhere except on caption tokens and EOS.
        """
        batch, embed = len(prefix), self.decoder.get_input_embeddings()
        device = embed.weight.device
        before, after = (ids.to(device).expand(batch, -1) for ids in self.prompt_ids(prompt))

        def part(ids, mask=None, learn=False):  # (embeddings, mask, labels) of token ids
            mask = torch.ones(ids.shape, dtype=torch.bool, device=device) if mask is None else mask
            return embed(ids), mask, ids.masked_fill(~mask, -100) if learn else torch.full_like(ids, -100)

        no_labels = torch.full(prefix_mask.shape, -100, dtype=torch.long, device=device)
        parts = [part(before), (prefix.to(embed.weight.dtype), prefix_mask, no_labels), part(after)]
        if captions is not None:
            parts.append(part(*self.caption_ids(captions, device), learn=True))
        embeds, mask, labels = (torch.cat(x, 1) for x in zip(*parts))
        order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices
        order = order[:, int((~mask).sum(1).min()):]  # drop columns that are padding in every row
        mask = mask.gather(1, order)
        context = self.decoder.config.max_position_embeddings
        if mask.shape[1] + new_tokens > context:
            raise ValueError(
                f"prompt ({before.shape[1] + after.shape[1]} tokens with the template) + prefix (up to "
                f"{prefix.shape[1]}) + {'caption' if captions is not None else f'max_new_tokens={new_tokens}'} = "
                f"{mask.shape[1] + new_tokens} tokens exceed the decoder's context of {context}; shorten the "
                "prompt or use fewer tokens (k) / max_new_tokens")
        out = {"inputs_embeds": embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1])),
               "attention_mask": mask.long(),
               "position_ids": (mask.long().cumsum(1) - 1).clamp(min=0)}
        if captions is not None:
            out["labels"] = labels.gather(1, order)
        return out
