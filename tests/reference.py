"""The model cards' own code, kept as close to the published snippets as possible, in fp32.

This is the yardstick for parity: it computes the full-vocabulary logits (reranker) and left-padded batches
with attention masks (both), exactly as Qwen's model cards do. Only the model/tokenizer paths and the fp32
dtype are parameters (transformers 5 would otherwise load the stored bf16 weights).
"""

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer


class ModelCardReranker:
    """Qwen3-Reranker model card, "Transformers Usage"."""

    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
              "the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
              "<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

    def __init__(self, path, max_length=8192):
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.max_length = max_length
        self.prefix_tokens = self.tokenizer.encode(self.prefix, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(self.suffix, add_special_tokens=False)

    @staticmethod
    def format_instruction(instruction, query, doc):
        if instruction is None:
            instruction = "Given a web search query, retrieve relevant passages that answer the query"
        output = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(
            instruction=instruction, query=query, doc=doc)
        return output

    def process_inputs(self, pairs):
        inputs = self.tokenizer(
            pairs, padding=False, truncation="longest_first",
            return_attention_mask=False, max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens)
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=self.max_length)
        for key in inputs:
            inputs[key] = inputs[key].to(self.model.device)
        return inputs

    @torch.no_grad()
    def compute_logits(self, inputs, **kwargs):
        batch_scores = self.model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, self.token_true_id]
        false_vector = batch_scores[:, self.token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        scores = batch_scores[:, 1].exp().tolist()
        return scores

    def scores(self, query, documents, instruction=None, batch_size=None):
        """The card's process_inputs + compute_logits, `batch_size` pairs per call (default: all at once).

        The card computes all 151669 logits at every position: 32 pairs of ~650 tokens need ~13 GB of fp32
        logits alone, so large workloads must call it in chunks.
        """
        pairs = [self.format_instruction(instruction, query, doc) for doc in documents]
        step = batch_size or len(pairs)
        return [score for start in range(0, len(pairs), step)
                for score in self.compute_logits(self.process_inputs(pairs[start:start + step]))]

    def token_counts(self, query, documents, instruction=None):
        inputs = self.process_inputs([self.format_instruction(instruction, query, doc) for doc in documents])
        return inputs["attention_mask"].sum(dim=1).tolist()


class ModelCardEmbedder:
    """Qwen3-Embedding model card, "Transformers Usage", plus the MRL cut for `dimensions`."""

    def __init__(self, path, max_length=8192):
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.max_length = max_length

    @staticmethod
    def last_token_pool(last_hidden_states, attention_mask):
        left_padding = (attention_mask[:, -1].sum() == attention_mask.shape[0])
        if left_padding:
            return last_hidden_states[:, -1]
        else:
            sequence_lengths = attention_mask.sum(dim=1) - 1
            batch_size = last_hidden_states.shape[0]
            return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]

    @staticmethod
    def get_detailed_instruct(task_description, query):
        return f"Instruct: {task_description}\nQuery:{query}"

    def batch_dict(self, input_texts):
        return self.tokenizer(input_texts, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    @torch.no_grad()
    def embeddings(self, input_texts, dimensions=None, normalize=True):
        """`normalize=False`: the pooled vectors before the card's F.normalize (what TEI's normalize: false asks)."""
        batch_dict = self.batch_dict(input_texts)
        outputs = self.model(**batch_dict)
        embeddings = self.last_token_pool(outputs.last_hidden_state, batch_dict["attention_mask"])
        if dimensions is not None:
            embeddings = embeddings[:, :dimensions]
        return F.normalize(embeddings, p=2, dim=1) if normalize else embeddings
